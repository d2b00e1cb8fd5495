"""``python tests/cli_with_hooks.py ARGS...``: polynext's command line with test hooks (for subprocesses and
torchrun), chosen by environment variables:

* ``POLYNEXT_TEST_STEPS=FILE``: after every optimizer step of the engine, one JSON line
  ``{"epoch", "batch", "global_step"}`` in ``FILE.rank<R>``, and one line per micro-batch in
  ``FILE.rank<R>.micro``: the work a process really did, step by step;
* ``POLYNEXT_TEST_WEIGHTS=DIR``: after every optimizer step, this rank's weights in
  ``DIR/rank<R>_step<global step>.pt``;
* ``POLYNEXT_TEST_KILL=mid_epoch_after_ema``: SIGKILL right after the first mid-epoch ``last``
  checkpoint of ``polynext train`` written once the EMA has made two updates (it then differs from the model); ``POLYNEXT_TEST_KILL=iteration=N``:
  right after the checkpoint of iteration N of ``polynext seg train`` or ``polynext det train``. The kill point is a
  deterministic place in the run, not a moment in time.

``record_steps(monkeypatch)`` installs the same step recording in the test process itself.
"""
import json
import os
import signal
import sys
from typing import Dict, List


def _install_step_hooks(on_step, on_micro_batch) -> None:
    from polynext.engine.step import TrainStep
    step_fn, backward_fn = TrainStep.optimizer_step, TrainStep.backward

    def optimizer_step(self, loss, *, epoch, batch):
        norm = step_fn(self, loss, epoch=epoch, batch=batch)
        on_step(self, epoch, batch)
        return norm

    def backward(self, loss):
        on_micro_batch(self)
        return backward_fn(self, loss)

    TrainStep.optimizer_step, TrainStep.backward = optimizer_step, backward


def record_steps(monkeypatch) -> Dict[str, List]:
    """Record, in this process, every optimizer step (epoch, batch, global step after it) and micro-batch."""
    from polynext.engine.step import TrainStep
    monkeypatch.setattr(TrainStep, 'optimizer_step', TrainStep.optimizer_step)
    monkeypatch.setattr(TrainStep, 'backward', TrainStep.backward)
    seen: Dict[str, List] = dict(steps=[], micro=[])
    _install_step_hooks(lambda s, e, b: seen['steps'].append((e, b, s.global_step)),
                        lambda s: seen['micro'].append(1))
    return seen


def read_steps(path) -> List[tuple]:
    """The steps recorded by ``POLYNEXT_TEST_STEPS`` (rank 0) as (epoch, batch, global step) tuples."""
    try:
        with open(f'{path}.rank0') as f:
            return [tuple(json.loads(line)[k] for k in ('epoch', 'batch', 'global_step')) for line in f]
    except FileNotFoundError:
        return []


def read_micro_batches(path) -> int:
    try:
        with open(f'{path}.rank0.micro') as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def assert_replicas_agree(weights_dir, steps: int) -> None:
    """The weights ``POLYNEXT_TEST_WEIGHTS`` wrote for ranks 0 and 1 are equal after every one of ``steps``
    optimizer steps (there are no more), and they moved. BatchNorm running statistics are left out: each
    replica keeps its own batches' (DDP broadcasts rank 0's before every forward)."""
    import torch
    from pathlib import Path
    weights_dir = Path(weights_dir)
    stats = ('running_mean', 'running_var', 'num_batches_tracked')
    for k in range(1, steps + 1):
        r0, r1 = (torch.load(weights_dir / f'rank{r}_step{k}.pt', weights_only=True) for r in (0, 1))
        assert r0.keys() == r1.keys()
        differ = [n for n in r0 if not n.endswith(stats) and not torch.equal(r0[n], r1[n])]
        assert not differ, f'the replicas differ after step {k}: {differ[:3]}'
    assert not (weights_dir / f'rank0_step{steps + 1}.pt').exists()
    first, last = (torch.load(weights_dir / f'rank0_step{k}.pt', weights_only=True) for k in (1, steps))
    assert any(not torch.equal(first[n], last[n]) for n in first if not n.endswith(stats)), 'the weights never moved'


def _main(argv: List[str]) -> int:
    rank = int(os.environ.get('RANK', '0'))
    steps_file = os.environ.get('POLYNEXT_TEST_STEPS')
    weights_dir = os.environ.get('POLYNEXT_TEST_WEIGHTS')
    kill = os.environ.get('POLYNEXT_TEST_KILL', '')
    if steps_file or weights_dir:
        def on_step(step, epoch, batch):
            if steps_file:
                with open(f'{steps_file}.rank{rank}', 'a') as f:
                    f.write(json.dumps(dict(epoch=epoch, batch=batch, global_step=step.global_step)) + '\n')
            if weights_dir:
                import torch
                torch.save(step.module.state_dict(), os.path.join(weights_dir, f'rank{rank}_step{step.global_step}.pt'))

        def on_micro_batch(step):
            if steps_file:
                with open(f'{steps_file}.rank{rank}.micro', 'a') as f:
                    f.write('1\n')
        _install_step_hooks(on_step, on_micro_batch)
    if kill == 'mid_epoch_after_ema':
        from polynext.train.trainer import Trainer
        save = Trainer.save

        def save_then_die(self, tag='last', **kwargs):
            save(self, tag, **kwargs)
            # two EMA updates at least: after the first one the EMA is a copy of the model, and a resume that
            # dropped the EMA state (restarting it from the model) would go unnoticed
            if tag == 'last' and self.ema is not None and self.ema.updates >= 2 and self.batch_in_epoch > 0:
                os.kill(os.getpid(), signal.SIGKILL)
        Trainer.save = save_then_die
    elif kill.startswith('iteration='):
        if argv[:1] == ['det']:
            from polynext.det.trainer import DetTrainer as TaskTrainer
        else:
            from polynext.seg.trainer import SegTrainer as TaskTrainer
        at, save = int(kill.split('=', 1)[1]), TaskTrainer.save

        def save_then_die(self, tag='last', **kwargs):
            save(self, tag, **kwargs)
            if tag == 'last' and self.iteration == at:
                os.kill(os.getpid(), signal.SIGKILL)
        TaskTrainer.save = save_then_die
    elif kill:
        raise SystemExit(f'unknown POLYNEXT_TEST_KILL={kill!r}')
    from polynext.cli import main
    return main(argv)


if __name__ == '__main__':
    sys.exit(_main(sys.argv[1:]))
