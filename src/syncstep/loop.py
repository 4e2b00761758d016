"""The fit loop: the epochs, the optimizer steps inside them, and when to log, validate, checkpoint and
stop. One optimizer step, top to bottom, is ``FitLoop.train_epoch``:

    for each micro-batch of the step (gradient accumulation):
        sync gradients only on the last micro-batch         (strategy.sync_gradients)
        loss = strategy.training_step(batches, ...)          (forward on each replica, weighted losses)
        backward (through the grad scaler for fp16)
        keep the loss for the NaN / inf check               (guards.py, at the next agreement)
    step()                                                   (step.py: clip, LR x multiplier, schedulers)
    log / validate / checkpoint / stop, each when it is due

With batch-level hooks (a callback's or the Module's on_train_batch_start / _end, on_before_backward,
on_after_backward) the same loop calls them around each micro-batch; with none it does not look. In
manual optimization (``automatic_optimization = False``) the user's training_step does the backward
and the optimizer steps (step.ManualOptimization); the loop only runs it and keeps the rest.

What is set up once per fit (the plan, the optimizer step, the guards, the checkpointer, the loggers)
is in ``FitLoop.__init__``; the end of an epoch is ``end_epoch``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from syncstep import checkpoint as ckpt
from syncstep import noise_scale
from syncstep.adascale import build as build_adascale
from syncstep.batch_ramp import build as build_ramp
from syncstep.evaluation import evaluate
from syncstep.fit_plan import hyperparameters, plan_fit, plan_summary
from syncstep.guards import Guards
from syncstep.model_summary import model_summary
from syncstep.module import Module
from syncstep.optim import unique_parameters
from syncstep.plan import plan_lr
from syncstep.precision import autocast, grad_scaler
from syncstep.progress import ProgressBar
from syncstep.resume import Checkpointer
from syncstep.step import ManualOptimization, OptimizerStep
from syncstep.throughput import Throughput


class FitLoop:
    def __init__(self, trainer: Any, model: Module, train_loader: Any, val_loader: Any) -> None:
        config, strategy, state = trainer.config, trainer.strategy, trainer.state
        self.trainer, self.model, self.config, self.strategy, self.state = trainer, model, config, strategy, state
        self.metrics, self.hooks = trainer.metrics, trainer.hooks
        plan = trainer._set_plan(plan_fit(config, strategy, model, train_loader, strategy.broadcast_object))
        self.plan, self.train = plan, plan.train
        self.train.set_replicas(strategy.replicas, strategy.gradient_averaging)
        self.guards = Guards(strategy, state, on_nonfinite_loss=config.on_nonfinite_loss,
                             log_every_n_steps=config.log_every_n_steps, print_fn=trainer.print)
        scaler = grad_scaler(config.precision, strategy.root_device)
        self.noise = trainer._noise = noise_scale.build(config, strategy, plan, scaler,
                                                        unique_parameters(plan.optimizers), model)
        # DDP's one communication hook: the configured compression, observed by the noise scale if on
        strategy.register_comm_hook([self.noise.comm_hook_wrapper] if self.noise and self.noise.source == "ddp" else [])
        self.adascale = build_adascale(config, strategy, plan, self.noise)
        self.stepper = OptimizerStep(
            optimizers=plan.optimizers, scheduler_configs=plan.scheduler_configs, lr_plan=plan.lr,
            lr_names=plan.lr_names, scaler=scaler, gradient_clip_val=config.gradient_clip_val,
            gradient_clip_algorithm=config.gradient_clip_algorithm, guards=self.guards, state=state,
            metric_values=self.metrics.values, hooks=self.hooks, adascale=self.adascale)
        self.stepper.noise = self.noise
        self.ramp = self.stepper.ramp = build_ramp(config, strategy, plan, self.noise, model, state,
                                                   apply=self.set_accumulation, print_fn=trainer.print)
        self.manual = None
        if not model.automatic_optimization:
            if config.gradient_clip_val is not None or config.on_nonfinite_loss == "skip":
                raise ValueError(
                    "with manual optimization (automatic_optimization = False) your training_step steps the "
                    "optimizers, so Trainer(gradient_clip_val=...) and on_nonfinite_loss='skip' cannot apply: "
                    "call self.clip_gradients(opt, gradient_clip_val=...) before opt.step() instead."
                )
            self.manual = ManualOptimization(optimizers=plan.optimizers, lr_plan=plan.lr, scaler=scaler,
                                             strategy=strategy, guards=self.guards, hooks=self.hooks, state=state)
        trainer._manual = self.manual
        strategy.manual = self.manual is not None
        self.hyperparams = hyperparameters(config, strategy, plan)
        self.checkpointer = Checkpointer(trainer=trainer, model=model, stepper=self.stepper, train_data=self.train,
                                         hyperparams=self.hyperparams, manual=self.manual)
        trainer._checkpointer = self.checkpointer
        self.val_loader = val_loader
        if val_loader is not None and type(model).validation_step is Module.validation_step:
            trainer.print("syncstep: validation data was given but the model defines no validation_step; skipping it.")
            self.val_loader = None
        if config.limit_val_batches == 0:
            self.val_loader = None
        trainer._fit_validates = self.val_loader is not None
        self.bar = ProgressBar(False)
        self.throughput = Throughput(strategy, flops_per_sample=config.flops_per_sample,
                                     peak_flops_per_device=config.peak_flops_per_device, precision=config.precision)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, ckpt_path: str | None) -> None:
        try:
            self._run(ckpt_path)
        finally:
            self.checkpointer.close()  # the checkpoint directory's lock (resume.py)

    def _run(self, ckpt_path: str | None) -> None:
        config, state, trainer, hooks = self.config, self.state, self.trainer, self.hooks
        start_epoch, start_sample = 0, 0
        if ckpt_path is not None:
            start_epoch, start_sample = self.checkpointer.restore(ckpt_path)
        elif config.enable_checkpointing and ckpt.step_checkpoints(config.checkpoint_dir):
            trainer.print(f"syncstep: note: {config.checkpoint_dir} holds checkpoints of an earlier run; this run's "
                          f"replace them (keep_last={config.keep_last}). To continue that run, pass ckpt_path='last'.")
        if config.max_epochs_defaulted:
            trainer.print("syncstep: neither max_epochs nor max_steps was set; training for max_epochs=1000.")
        if config.fast_dev_run:
            trainer.print(f"syncstep: fast_dev_run: {state.global_step + config.max_steps} step(s) and validation "
                          "batch(es) only; no loggers, no checkpoints.")
        trainer.print(plan_summary(config, self.strategy, self.plan))
        if config.enable_model_summary:
            trainer.print(model_summary(self.model))
        for logger in self.metrics.loggers:
            if hasattr(logger, "log_hyperparams"):
                logger.log_hyperparams({**self.model.hparams, **{f"syncstep/{k}": v
                                                                 for k, v in self.hyperparams.items()}})
        self.bar = ProgressBar(trainer._bar_enabled())
        self.throughput.start(state.global_step)
        state.should_stop = False
        try:
            with self.guards.catching_signals():
                for opt in self.plan.optimizers:
                    opt.zero_grad(set_to_none=True)
                hooks.call("on_fit_start")
                self.sanity_check()
                hooks.call("on_train_start")
                max_epochs = config.max_epochs if self.adascale is None else self.adascale.max_epochs(config.max_epochs)
                for epoch in range(start_epoch, max_epochs if max_epochs is not None else sys.maxsize):
                    self.guards.agree()  # a should_stop set on one rank (at the epoch's end, say) holds on all
                    if (self.guards.should_stop() and self.may_stop(epoch)) or self.steps_exhausted():
                        break
                    state.current_epoch = epoch
                    if self.ramp is not None:  # (may change the accumulation: the epoch is cut below)
                        self.ramp.start_epoch(epoch)
                    completed = self.train_epoch(epoch, start_sample if epoch == start_epoch else 0)
                    self.end_epoch(epoch, completed)
                    if state.preempted:
                        return
                if self.noise is not None:
                    noise_scale.finish(trainer, self.noise, self.state.global_step)
                hooks.call("on_train_end")
                hooks.call("on_fit_end")
            self.metrics.flush()
            summary = self.throughput.summary(state.global_step)
            if summary:
                trainer.print(summary)
        finally:
            self.bar.close()

    def steps_exhausted(self) -> bool:
        if self.adascale is not None:  # the progress tau of the reference run's steps, not max_steps
            return self.adascale.done
        return 0 <= self.config.max_steps <= self.state.global_step

    def may_stop(self, epoch: int, quiet: bool = False) -> bool:
        """Whether a stop request (trainer.should_stop) may end the run in or before ``epoch`` (``epoch``
        epochs done): not before min_epochs and min_steps are done (Lightning's rule; it says so at an
        epoch's end, ``quiet`` between steps)."""
        config, state = self.config, self.state
        if epoch >= (config.min_epochs or 0) and state.global_step >= (config.min_steps or 0):
            return True
        if not quiet:
                self.trainer.print(f"syncstep: a stop was requested, but min_epochs={config.min_epochs} / min_steps="
                               f"{config.min_steps} is not reached yet; training goes on.")
        return False

    def val_every(self, steps: int) -> int:
        """Optimizer steps between validations inside an epoch (0: only at the epoch's end)."""
        interval = self.config.val_check_interval
        if self.val_loader is None or interval is None:
            return 0
        if isinstance(interval, float):
            return max(1, int(steps * interval)) if interval < 1 else 0
        return interval

    def sanity_check(self) -> None:
        """num_sanity_val_steps validation batches before training (nothing they log is kept)."""
        steps = self.config.num_sanity_val_steps
        if self.val_loader is None or steps == 0:
            return
        trainer = self.trainer
        trainer.sanity_checking = True
        try:
            self.hooks.call("on_sanity_check_start")
            evaluate(trainer, self.val_loader, "validate", limit=None if steps == -1 else steps, sanity=True)
            self.hooks.call("on_sanity_check_end")
        finally:
            trainer.sanity_checking = False
        self.model.train()

    # -- one epoch: the step loop ----------------------------------------------------------------
    def train_epoch(self, epoch: int, start_sample: int) -> bool:
        """Train one epoch from ``start_sample``; False if it stopped early (max_steps, a signal, should_stop)."""
        state, logs, bar, guards, hooks = self.state, self.metrics.store, self.bar, self.guards, self.hooks
        steps = self.train.steps_per_epoch(start_sample)
        val_every = self.val_every(steps)
        self.checkpointer.epoch_finished = False
        self.model.train()
        hooks.call("on_train_epoch_start")
        bar.start(f"Epoch {epoch}", steps)
        state.epoch_sample = start_sample
        logs.context.stage = "train"
        # Everything that does not change within the epoch is looked up once, here: on a tiny model
        # every attribute lookup and call left in the loop below shows in the step time.
        forward, clear_step_values = self.strategy.training_step, logs.step_entries.clear
        autocast_, scaler = autocast(self.config.precision, self.strategy.root_device), self.stepper.scaler
        # Gradients are synced on every backward unless some micro-batches accumulate without a sync.
        sync_gradients = self.strategy.sync_gradients if self.train.layout.accumulate_grad_batches > 1 else None
        losses, step = guards.losses, self.stepper.for_epoch(epoch)  # losses: read at the next agreement
        manual, timer = self.manual, self.throughput  # timer: throughput.py
        # each rank's time before backward names a straggler; one process has none to name, and no clock calls
        clock = time.perf_counter if self.strategy.num_processes > 1 else None
        noise = self.noise
        if manual is not None:
            manual.epoch, step = epoch, None
        # The noise scale: each micro-batch's gradient (one process) and, before the step, the step's norms.
        after_backward = noise.after_backward if noise is not None and noise.source == "micro" else None
        full_step = self.plan.batch.global_batch_size
        batch_hooks = hooks.per_batch or manual is not None  # (manual: training_step's outputs for the hooks)
        log_every, ckpt_every, max_steps = self.config.log_every_n_steps, self.config.ckpt_every_n_steps, \
            self.config.max_steps
        adascale, ramp = self.adascale, self.ramp
        if adascale is not None:
            max_steps = -1  # the run ends when adascale.done
        bar_every, bar_steps = (bar.every if bar.bar is not None else 0), 0  # the bar, told every bar_every steps
        batch_idx, completed = 0, True
        plan, batches = self.train.start_epoch(epoch, start_sample)
        for step_in_epoch, (step_samples, micro_batches) in enumerate(plan):
            clear_step_values()
            for counts, weights, is_last in micro_batches:  # one per accumulation step
                if sync_gradients is not None:
                    sync_gradients(is_last)
                if batch_hooks:  # the batches are fetched here, so that the hooks see them
                    fetched = [next(batches) for _ in counts]
                    batch, batches_in = (fetched[0] if len(fetched) == 1 else fetched), iter(fetched)
                    hooks.call("on_train_batch_start", batch, batch_idx)
                else:
                    batches_in = batches
                if manual is not None:
                    manual.weight = sum(weights)
                if clock is not None:
                    started = clock()
                if autocast_ is None:
                    loss = forward(batches_in, counts, weights, batch_idx)
                else:
                    with autocast_:
                        loss = forward(batches_in, counts, weights, batch_idx)
                if clock is not None:  # this rank's own time, before backward waits for the others
                    timer.busy += clock() - started
                if manual is None:
                    if batch_hooks:
                        hooks.call("on_before_backward", loss)
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    # Detached: kept with its graph, a loss would keep what the graph references until the
                    # next agreement; under fsdp, every unit's all-gathered parameters (guards.py).
                    losses.append((state.global_step, loss.detach()))
                    if after_backward is not None:
                        after_backward()
                    if batch_hooks:
                        hooks.call("on_after_backward")
                        batch_end = ({"loss": loss.detach() / (sum(weights) or 1.0)}, batch, batch_idx)
                elif batch_hooks:
                    batch_end = (loss, batch, batch_idx)
                batch_idx += 1
            if noise is not None:
                noise.end_step(step_samples == full_step)
            if adascale is not None:  # (tau counts a short last step by its share of the batch)
                adascale.step_samples = step_samples
            if ramp is not None:
                ramp.step_samples = step_samples
            if step is not None:
                step()
            if batch_hooks:
                hooks.call("on_train_batch_end", *batch_end)
            state.epoch_sample += step_samples
            timer.samples += step_samples
            bar_steps += 1
            if bar_steps == bar_every:
                bar_every, bar_steps = bar.advance(bar_steps), 0
            global_step = state.global_step
            if global_step % log_every == 0:
                self.log_step(epoch)
            if val_every and (step_in_epoch + 1) % val_every == 0 and step_in_epoch + 1 < steps:
                self.validate(epoch)
                logs.context.stage = "train"
            if ckpt_every and global_step % ckpt_every == 0:
                self.checkpointer.save(guards, epoch_finished=False)
            if global_step >= guards.next_agreement:  # (never in one process; see guards.py)
                guards.agree()
            stop = guards.preempting or 0 <= max_steps <= global_step or \
                (adascale is not None and adascale.done) or \
                (state.should_stop and guards.should_stop() and self.may_stop(epoch, quiet=True))  # (Lightning's)
            if stop and step_in_epoch + 1 < steps:
                completed = False
                break
        bar.advance(bar_steps)
        return completed

    def set_accumulation(self, accumulation: int, resumed: bool = False) -> str:
        """The batch ramp's change (batch_ramp.py): the epoch's layout re-cut and the LR re-derived for the
        new global batch, the meter told (``resumed``: from a checkpoint); returns the LR line to print."""
        config, old = self.config, self.plan
        batch = dataclasses.replace(old.batch, accumulate_grad_batches=accumulation)
        self.train.set_accumulation(batch, config.limit_train_batches, config.max_steps)
        lr = plan_lr(old.optimizers, config.lr_scaling, batch, old.lr.warmup)
        self.plan = self.trainer._set_plan(dataclasses.replace(old, batch=batch, lr=lr,
                                                               steps_per_epoch=self.train.steps_per_epoch(0)))
        self.stepper.lr_plan = lr
        if self.noise is not None:
            _, w, small_batch, _ = noise_scale.measurable(self.strategy, batch)
            self.noise.set_batch(batch, w, small_batch, None if resumed else self.state.global_step)
        return "; ".join(f"lr {o.name}: {o.rule}, factor {before.factor:.6g} -> {o.factor:.6g}"
                         for before, o in zip(old.lr.optimizers, lr.optimizers))

    # -- what runs when it is due ----------------------------------------------------------------
    def log_step(self, epoch: int) -> None:
        step = self.state.global_step
        rank_times = self.guards.agree(self.throughput.payload(step))  # (in the all-reduce agree makes anyway)
        values = self.metrics.step_values(self.strategy)
        values.update(self.stepper.lr_values() if self.manual is None else self.manual.lr_values(self.plan.lr_names))
        if self.noise is not None:
            values.update(self.noise.log_values(self.state.global_step))
            if self.adascale is not None:
                self.adascale.refresh()
                values["adascale/tau"] = self.adascale.tau
        self.metrics.update(values)
        speed = self.throughput.values(rank_times, step)  # to the loggers only, not callback_metrics
        if self.trainer.is_global_zero:
            self.metrics.send({"epoch": epoch, **values, **speed}, step)
            self.bar.show({k: v for k, v in values.items() if k in self.metrics.store.prog_bar})

    def validate(self, epoch: int) -> None:
        values = evaluate(self.trainer, self.val_loader, "validate")
        if self.trainer.is_global_zero:
            self.metrics.send({"epoch": epoch, **values}, self.state.global_step)
        self.model.train()

    def end_epoch(self, epoch: int, completed: bool) -> None:
        """Epoch metrics, validation, on_train_epoch_end, epoch schedulers, checkpoint, the SIGTERM stop.

        An epoch cut short (max_steps, a signal, should_stop) logs what it has and is checkpointed mid-epoch, but its
        epoch-interval schedulers and on_train_epoch_end wait for the epoch to really end, so that a
        resumed run steps them exactly once, as an uninterrupted run does. As in Lightning, validation
        comes before on_train_epoch_end, and ModelCheckpoint / EarlyStopping run last, after the epoch
        schedulers have stepped (so that what they save resumes exactly).
        """
        guards, metrics, config, trainer = self.guards, self.metrics, self.config, self.trainer
        guards.agree()
        metrics.update(metrics.step_values(self.strategy))
        epoch_values = metrics.epoch_values(self.strategy)
        metrics.update(epoch_values)
        if trainer.is_global_zero and epoch_values:
            metrics.send({"epoch": epoch, **epoch_values}, self.state.global_step)
        preempted = guards.preempting
        due = config.check_val_every_n_epoch and (epoch + 1) % config.check_val_every_n_epoch == 0
        if self.val_loader is not None and not preempted and ((completed and due) or self.steps_exhausted()):
            self.validate(epoch)
        self.bar.show({k: v for k, v in metrics.values.items() if k in metrics.store.prog_bar})
        self.bar.close()
        if completed:
            self.hooks.on_train_epoch_end(between=lambda: self._epoch_end_values(epoch))
        due = config.ckpt_every_n_epochs and (epoch + 1) % config.ckpt_every_n_epochs == 0
        # (an epoch cut short by should_stop is the end of the run: checkpointed, like max_steps)
        if config.enable_checkpointing and (preempted or not completed or due or self.steps_exhausted()):
            self.checkpointer.save(guards, epoch_finished=completed)
        metrics.flush()
        if preempted:
            self.state.preempted = True
            received = guards.signal_received or "a stop signal"
            if config.enable_checkpointing:
                trainer.print(f"syncstep: {received} received; checkpoint saved at step {self.state.global_step} in "
                              f"{config.checkpoint_dir}; exiting. Resume with trainer.fit(..., ckpt_path='last').")
            else:
                trainer.print(f"syncstep: {received} received at step {self.state.global_step}; exiting WITHOUT a "
                              "checkpoint (enable_checkpointing=False).")

    def _epoch_end_values(self, epoch: int) -> None:
        """After the Module's on_train_epoch_end: what it logged, then the epoch schedulers."""
        values = self.metrics.epoch_values(self.strategy)
        if values:
            self.metrics.update(values)
            if self.trainer.is_global_zero:
                self.metrics.send({"epoch": epoch, **values}, self.state.global_step)
        if self.manual is None:  # (in manual optimization the user steps the schedulers, as in Lightning)
            self.stepper.end_epoch(epoch)
        self.checkpointer.epoch_finished = True
