"""The tasks, in the order they claim a job (runtime/tasks/base.py): the first whose `applies(job, model_dir)` is
true runs it. Adding a task adds its module here."""

from __future__ import annotations

from sdrt.runtime.tasks import depth, img2img, inpaint, inpaint_a1111, outpaint, refine, txt2img, unclip, upscale

TASKS = (refine, upscale, unclip, txt2img, depth, img2img, outpaint, inpaint_a1111, inpaint)
BY_NAME = {task.NAME: task for task in TASKS}
VALIDATING = (outpaint, inpaint_a1111, upscale, depth, unclip)  # tasks with request checks of their own, in the order they run


def task_for(job, model_dir):
    return next(task for task in TASKS if task.applies(job, model_dir))
