"""The sections of launch/benchmark.py, one module each.

- ``common``: presets, synthetic batches, device syncs, peak memory
- ``step``: the training step timed (the ``train`` section and its table)
- ``phases``: where the step goes, phase by phase, through ``TrainStep.clock``
- ``diagnose``: a profile of the step and its host syncs
- ``sweep``: the step at several batch sizes
- ``reference``: bench_reference.py's step in the same process
- ``comm``: collectives counted at the dispatcher, and the bytes the code declares
- ``dist_section``: 2 gloo ranks, measured bytes against the declared ones
- ``projection``: samples/s per GPU at 8-512 GPUs from the declared bytes
- ``data``: the data pipeline per loader worker (also launch/bench_data.py)
- ``evaluation``: scoring and encoding of the evaluation job (also launch/bench_eval.py)
- ``memory``: peak memory per sample and the largest batch under a cap, each
  probe a fresh process (launch/bench_memory.py)

Imported as ``launch.bench`` with the repository root on sys.path (the
scripts in launch/ put it there, as train.py does).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
