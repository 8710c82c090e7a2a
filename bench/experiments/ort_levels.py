"""ONNX Runtime's graph optimization levels on one exported graph: session creation time and two calls.

    python -m sdrt.bench.experiments.ort_levels UNET_ONNX LEVEL THREADS LATENT_SIDE      # LEVEL: basic | extended | all

Feeds a UNet graph (sample, timestep, encoder_hidden_states) a batch of 2 random inputs at LATENT_SIDE² latents. How
engines/ort.py's default level was chosen: run each level in a fresh process, one after the other.
"""

import sys
import time

import numpy as np
import onnxruntime as ort


def main(argv: list[str]) -> None:
    path, level, threads, side = argv[0], argv[1], int(argv[2]), int(argv[3])
    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    options.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    width = session.get_inputs()[2].shape[2]
    feed = {"sample": np.random.randn(2, 4, side, side).astype(np.float32), "timestep": np.array(500.0, np.float32),
            "encoder_hidden_states": np.random.randn(2, 77, width).astype(np.float32)}
    session.run(None, feed)
    t2 = time.perf_counter()
    session.run(None, feed)
    t3 = time.perf_counter()
    print(f"{level}: load {t1 - t0:.1f} s, first call {t2 - t1:.2f} s, second {t3 - t2:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
