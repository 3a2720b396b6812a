"""The Trainer: compiled, loss-scaled train and eval steps with hooks for subclasses.

The public methods (``train_steps``, ``evaluate``) are fixed; subclasses override the
protected hooks (``build_datasets``, ``build_model``, ``build_optimizer``, ``compute_loss``,
``build_metrics``, ``update_metrics``). The base class owns the ``tf.function`` wrapping and
caching, the distribution strategy and loss scaling, so a subclass cannot get them wrong.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

from trainer import compat, data, registry
from trainer.compat import keras, tf
from trainer.config import TrainConfig
from trainer.core import contracts, optimizers, precision, weighted_metrics
from trainer.core.loss_scale import LossScaler
from trainer.data import in_graph
from trainer.errors import UserError
from trainer.runtime import devices, distribution, lockstep

_NO_LIMIT = 2 ** 63 - 1  # max_consecutive_skips=0: the loop never stops for skips.


def _split(t: tf.Tensor, k: int) -> tf.Tensor:
    """``[B, ...]`` -> ``[k, B / k, ...]``, keeping every static dimension known."""
    shape = t.shape.as_list()
    dynamic = tf.shape(t)
    micro = shape[0] // k if shape[0] is not None else -1
    rest = [d if d is not None else dynamic[i + 1] for i, d in enumerate(shape[1:])]
    return tf.reshape(t, [k, micro] + rest)


class Trainer:
    """Trains one model under one dtype policy with explicit loss scaling.

    Construction creates every variable (model weights, optimizer slots, loss-scale state,
    metrics) before the first trace, so tracing never creates state and a checkpoint can be
    restored into a fully built object.

    Every step runs one finiteness check on the all-reduced gradients, under every policy and
    loss-scale mode: a step with an Inf or NaN gradient is not applied, still counts as a
    step, and is counted in ``skipped_steps`` and ``consecutive_skips``. A step loop stops
    early, at exactly that step, once ``consecutive_skips`` reaches
    ``config.max_consecutive_skips`` (or, under a dynamic scale, a step is skipped with the
    scale at its floor of 1).

    Gradient accumulation (``config.grad_accum_steps = k``): each replica's share of the
    global batch (``batch_size / replicas``, which k must divide) is split into k equal
    micro-batches that run one after another inside the compiled step, so only one
    micro-batch's activations are alive at a time. Their unscaled float32 gradients are summed,
    then come one finiteness check, one all-reduce and one optimizer update; ``global_step``
    counts updates. The per-example loss is divided by the global batch either way, so for a
    model in which each example's output depends on that example alone, the update equals one
    step on the whole batch (up to float rounding; ``tests/test_accumulation.py`` checks it).
    Layers that look across the batch break that equality: in training, BatchNormalization
    normalises each micro-batch with that micro-batch's own mean and variance (statistics of
    k times fewer examples, so noisier) and updates its moving mean and variance k times per
    optimizer step, as k steps of the smaller batch would; a loss or layer that compares
    examples within a batch sees only its micro-batch. Dropout draws a fresh mask per
    micro-batch: the same distribution as on one big batch, not the same random numbers.
    So accumulation equals one big batch only for models without batch-dependent layers.

    Input: step ``s`` trains on examples ``[s * batch_size, (s + 1) * batch_size)`` of the
    training stream. Data held in memory (``Datasets.in_graph_input``) is gathered inside the
    compiled step loop (``self.in_graph_input``, see ``trainer/data/in_graph.py``; one
    replica, not on Gaudi); otherwise ``train_iterator`` reads the tf.data pipeline. Both give
    the same batches.

    Args:
      config: the run configuration.
      strategy: a ``tf.distribute`` strategy; the default (no-op) strategy when None.

    Raises:
      UserError: ``config.policy`` is 'auto' (``trainer.run`` resolves it),
        ``grad_accum_steps`` does not divide the per-replica batch, the model's
        output is not float32 under a mixed policy, or ``build_datasets`` returned a
        ``train`` and ``train_from`` that disagree.
    """

    def __init__(self, config: TrainConfig, *, strategy: Optional[tf.distribute.Strategy] = None):
        precision.check_trainable(config.policy)
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        contracts.check_accumulation(config, self.strategy.num_replicas_in_sync)
        # Same seed, same initial weights and data order: runs under different policies are
        # comparable. Seed before the datasets: tf.data's shuffle seed combines with the global
        # seed, so seeding later made the order depend on whatever ran before in the process.
        keras.utils.set_random_seed(config.seed)
        # Which worker this is: sharded input (record files) reads only its own share.
        self.input_context = distribution.input_context(self.strategy)
        self.datasets = self.build_datasets()
        contracts.check_train_from(self.datasets, type(self).__name__)
        if config.deterministic:
            # Bit-exact resume: deterministic kernels, and layer RNGs (dropout) held in
            # tf.random.Generator variables, which are saved with the model.
            tf.config.experimental.enable_op_determinism()
            compat.seed_layers()
        with self.strategy.scope():
            with precision.policy_scope(config.policy):
                self.model = self._call_hook(self.build_model, "build_model() returned a model")
            sample = tf.zeros((1,) + tuple(self.datasets.input_shape), tf.float32)
            precision.check_output_dtypes(self.model, self.model(sample, training=False),
                                          policy=config.policy,
                                          auto_cast=config.auto_cast_outputs)
            inner_optimizer = self._call_hook(self.build_optimizer,
                                              "build_optimizer() returned an optimizer")
            optimizers.prepare(inner_optimizer)
            self.loss_scaler = LossScaler(inner_optimizer, mode=config.resolved_loss_scale)
            self.optimizer = self.loss_scaler.optimizer
            self.loss_scaler.build(self.model.trainable_variables)
            self.train_metrics = {"loss": keras.metrics.Mean(name="loss"), **self._metrics()}
            self.eval_metrics = {"loss": keras.metrics.Mean(name="loss"), **self._metrics()}
            counter = dict(initial_value=0, dtype=tf.int64, trainable=False,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.skipped_steps = tf.Variable(name="skipped_steps", **counter)
            # Layer RNG state (dropout) the model's own checkpoint keys miss; made here, in
            # the strategy's scope, where Keras 2 would make it lazily at the first draw.
            self.rng_variables = compat.rng_variables(self.model)
            self.consecutive_skips = tf.Variable(name="consecutive_skips", **counter)
        self._distributed: Dict[int, object] = {}
        self._train_iterator = None
        # Seconds the step loop waited for its next batch (this worker's own; see
        # _train_loop_fn): the share of step time spent waiting for input.
        self.input_wait_s = tf.Variable(tf.constant(0.0, tf.float64), trainable=False,
                                        name="input_wait_s")
        # Bytes read from mark_reads() to the end of the first step loop (see mark_reads).
        self.first_loop_read_bytes: Optional[int] = None
        self._read_mark: Optional[int] = None
        self.in_graph_input = in_graph.InGraphInput.maybe(self.datasets, self.strategy,
                                                            config.batch_size)
        self._train_loop = tf.function(self._train_loop_fn)
        self._eval_loop = tf.function(self._eval_loop_fn)
        # XLA compiles the per-replica math (forward, loss, backward); the iterator, the
        # all-reduce and the optimizer update stay outside, where every strategy supports them.
        self._gradients = tf.function(self._gradients_fn, jit_compile=True) \
            if config.jit_compile else self._gradients_fn

    def _call_hook(self, hook, what: str):
        """Calls a build hook; an object (or a failure) from the other Keras is one UserError."""
        try:
            built = hook()
        except Exception as error:  # noqa: BLE001 - only a mix of Kerases is translated.
            mixed = compat.mixed_keras_error(error, f"{type(self).__name__}.{hook.__name__}()")
            if mixed is None:
                raise
            raise mixed from None
        if not isinstance(built, dict):
            compat.check_parts(built, what)
        return built

    def _metrics(self) -> Dict[str, keras.metrics.Metric]:
        metrics = self._call_hook(self.build_metrics, "build_metrics() returned a dict")
        for name, metric in metrics.items():
            compat.check_same_keras(metric, f"build_metrics()[{name!r}]")
        return metrics

    # ------------------------------------------------------------------ hooks

    def build_datasets(self) -> data.Datasets:
        """Returns the train/validation/test pipelines (runs eagerly, once).

        ``train`` must be infinite and yield ``(features, labels)`` batches of the **global**
        batch size; the strategy splits each batch across replicas. Sharded streams
        (``Datasets.sharded``: record files, ``data.from_files(...,
        input_context=self.input_context)``) are this worker's share instead, at its share
        of the batch.

        When ``train_from`` is set, the Trainer reads ``train_from(examples_seen)``, not
        ``train``: ``train_from(n)`` must be ``train`` with its first ``n`` examples skipped.
        To change the training data, use ``super().build_datasets().map_train(fn)``, which
        maps both alike, or set ``train_from=None`` (then the iterator's state is checkpointed
        where it can be). A ``train`` whose element spec differs from ``train_from(0)``'s is
        refused.
        """
        return data.load(self.config, input_context=self.input_context)

    def build_model(self) -> keras.Model:
        """Returns the model; runs eagerly under the run's dtype policy and strategy scope.

        The default builds the registered model ``config.model``. Every output must be float32
        under a mixed policy (give the last layer ``dtype='float32'``).
        """
        return registry.build_model(self.config.model, input_shape=self.datasets.input_shape,
                                    num_classes=self.datasets.num_classes,
                                    model_args=self.config.model_args)

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        """Returns the inner optimizer; the base class wraps it for loss scaling."""
        config = self.config
        learning_rate = optimizers.schedule(
            config.lr_schedule, config.learning_rate, warmup_steps=config.warmup_steps,
            total_steps=config.epochs * self.datasets.steps_per_epoch)
        return optimizers.build(config.optimizer, learning_rate)

    def compute_loss(self, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        """Returns the float32 loss of each example, shape ``[per_replica_batch]``.

        Runs in graph, once per replica (and once per micro-batch under gradient
        accumulation, where the batch is the micro-batch). Return per-example values, not a
        mean: the base class sums them and divides by the **global** batch size, so that when
        the strategy sums the gradients of N replicas the result is the gradient of the global
        mean loss (a plain per-replica mean would make the update N times too large). Reduce
        any other axes yourself: a result of another shape (a scalar, or ``[batch, 28, 28]``)
        is refused with an error when the step is first traced.
        """
        return keras.losses.sparse_categorical_crossentropy(labels, outputs)

    def build_metrics(self) -> Dict[str, keras.metrics.Metric]:
        """Returns fresh metrics (besides 'loss'); called twice, for training and evaluation."""
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy(name="accuracy")}

    def update_metrics(self, metrics: Dict[str, keras.metrics.Metric], labels, outputs) -> None:
        """Updates ``metrics`` for one batch; runs in graph, once per replica.

        Keras metrics keep float32 running sums (in bf16, 4096 + 1 == 4096) and are
        aggregated across replicas when read.

        In evaluation, batches are padded to full size and each example carries a weight
        (0 for padding). ``metrics`` are then views whose ``update_state(...)`` (and call)
        pass that weight as ``sample_weight`` by themselves, times any ``sample_weight`` you
        pass: call ``update_state`` with per-example values, as here, and padding never
        counts. A custom ``keras.metrics.Metric`` must accept and honour ``sample_weight``.
        """
        metrics["accuracy"].update_state(labels, outputs)

    # ------------------------------------------------------------------ state

    @property
    def global_step(self) -> tf.Variable:
        """Optimizer steps taken, skipped (non-finite) steps included (a ``tf.Variable``)."""
        return compat.tf_variable(self.optimizer.iterations)

    @property
    def model_name(self) -> str:
        """The registered name (``config.model``), or the model's own for a custom build_model."""
        if type(self).build_model is Trainer.build_model:
            return self.config.model
        return self.model.name

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 when loss scaling is off)."""
        return float(self.loss_scaler.scale)

    def checkpoint_items(self) -> Dict[str, object]:
        """Everything a checkpoint must hold for an exact resume.

        Model weights (and layer RNG state), the optimizer with its slots, step counter and
        loss-scale state (current scale, good-step counter), the skip counters, the training
        metrics of the running epoch and the input iterator's position.
        """
        items = {
            "model": self.model,
            # The optimizer with its slots and step counter, and a dynamic loss scale's state
            # (current scale, good-step counter), under keys that do not depend on whether
            # the optimizer is wrapped (compat.optimizer_items).
            **compat.optimizer_items(self.optimizer, self.loss_scaler.inner_optimizer),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "train_metrics": compat.metrics_checkpoint(self.train_metrics),
        }
        if self.rng_variables:  # Dropout state the model's own checkpoint keys miss.
            items["model_rng"] = tf.train.Checkpoint(
                **{f"generator_{i}": v for i, v in enumerate(self.rng_variables)})
        # The input position is not here: with `train_from` it follows from the global step
        # (see train_iterator); an iterator's own state is this worker's alone and is saved
        # beside the checkpoint by each worker (input_state).
        return items

    @property
    def train_iterator(self):
        """The training input, created on first use at the global step's position.

        First use comes after any checkpoint restore, so a resumed run continues exactly where
        the saved one was: ``global_step * batch_size`` examples into the stream (read from
        ``train_from``, unless :meth:`restore_input` restored the iterator's own state).
        """
        if self._train_iterator is None:
            dataset = self.datasets.train
            if self.datasets.train_from is not None:
                seen = int(self.global_step.numpy()) * self.config.batch_size
                dataset = self.datasets.train_from(seen)
            self._train_iterator = self._iterate(dataset)
        return self._train_iterator

    @property
    def saves_input_state(self) -> bool:
        """Whether each checkpoint saves the training iterator's state (each worker its own).

        False where the position follows from the global step (in-memory data), or the
        iterator is a ``tf.distribute`` one, which is not trackable: then ``train_from``
        replays the position (reading and skipping) or, without it, the stream restarts.
        """
        datasets = self.datasets
        if self.in_graph_input is not None or not (
                datasets.checkpoint_iterator or datasets.train_from is None):
            return False
        if datasets.sharded:
            return self.strategy.num_replicas_in_sync == self.input_context.num_input_pipelines
        # The default strategy gives the dataset itself back: a plain, trackable iterator.
        return isinstance(self._distribute(datasets.train), tf.data.Dataset)

    def input_state(self):
        """The training iterator that :attr:`saves_input_state` saves, else None."""
        return self.train_iterator if self.saves_input_state else None

    def restore_input(self, path: Optional[str]) -> None:
        """Continues the input from the iterator state saved at ``path`` (None: from the
        global step, via ``train_from``, as when no state was saved)."""
        self._train_iterator = None
        if path is None:
            return
        iterator = self._iterate(self.datasets.train)
        tf.train.Checkpoint(iterator=iterator).restore(path).assert_consumed()
        self._train_iterator = iterator

    def restart_input(self) -> None:
        """After a restore into a Trainer that already trained: the next step reads the stream
        at the restored global step.

        With ``train_from`` (and in-graph input, which gathers each batch at the global step)
        the position follows from the step, so the iterator is made anew on next use. An
        iterator whose state the checkpoint saved (:attr:`saves_input_state`) was set back by
        the restore itself (``Checkpointer``, via :meth:`restore_input`) and is kept.
        """
        if self.datasets.train_from is not None and not self.saves_input_state:
            self._train_iterator = None

    def weights_checksum(self) -> float:
        """A float64 sum of every model weight, to compare runs."""
        return float(sum(tf.reduce_sum(tf.cast(w, tf.float64)).numpy() for w in compat.weights(self.model)))

    def weights_finite(self) -> bool:
        """True when every floating-point model weight is finite (no Inf, no NaN)."""
        return all(bool(tf.reduce_all(tf.math.is_finite(w)).numpy())
                   for w in compat.weights(self.model) if w.dtype.is_floating)

    # ------------------------------------------------------------------ public, fixed

    def train_steps(self, num_steps: int, max_consecutive_skips: Optional[int] = None) -> None:
        """Runs up to ``num_steps`` train steps in one compiled call (an in-graph loop).

        The loop ends early, right after the step at which ``consecutive_skips`` reaches
        ``max_consecutive_skips`` (default ``config.max_consecutive_skips``; 0: no limit), or,
        under a dynamic loss scale, a step is skipped with the scale at its floor (1); it runs
        no step when that holds already. ``global_step`` tells how far it got and
        ``loop.fit_loop.storm_reason`` why it stopped. The counts go in as tensors, so new values
        do not retrace.
        """
        lockstep.collective("train steps")  # Each step all-reduces its gradients.
        limit = self.config.max_consecutive_skips if max_consecutive_skips is None \
            else max_consecutive_skips
        # In-graph input needs no iterator: each step gathers its batch at the global step.
        iterator = None if self.in_graph_input is not None else self.train_iterator
        with self._input_errors():
            self._train_loop(iterator, tf.constant(num_steps, tf.int32),
                             tf.constant(limit or _NO_LIMIT, tf.int64))
        if self._read_mark is not None:
            self.first_loop_read_bytes = (devices.bytes_read() or 0) - self._read_mark
            self._read_mark = None

    def mark_reads(self) -> None:
        """Starts counting the bytes this process reads until the first step loop ends.

        Called after a resume: with streamed data the count shows what continuing needed
        (the iterator's read-ahead, not the records already trained on).
        """
        self._read_mark = devices.bytes_read()

    @contextlib.contextmanager
    def _input_errors(self):
        """A TensorFlow error that a bad record caused becomes one line naming the record."""
        try:
            yield
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
            line = self.datasets.explain(error) if self.datasets.explain else None
            if line:
                raise UserError(line) from None
            raise

    def evaluate(self, dataset: tf.data.Dataset) -> Dict[str, float]:
        """Returns the mean loss and metrics over the examples of the finite ``dataset``.

        ``dataset`` yields ``(features, labels)`` or, Keras's convention, ``(features,
        labels, weights)`` batches. Every batch goes in full-size and with a static shape
        (``data.full_batches`` pads the last one with weight-0 examples), so under any
        strategy each replica and worker gets an equal, non-empty share and a compiled step
        never meets a new shape. The loss and every metric weigh each example by its weight,
        so padding never counts: the result is that of the real examples alone.
        """
        lockstep.collective("evaluate")  # Batches are all-reduced: every worker evaluates.
        for metric in self.eval_metrics.values():
            metric.reset_state()
        full = data.full_batches(dataset, self.config.batch_size)
        # The pipelines of data.make_datasets are full already: their distributed form is
        # cached. Another dataset is padded anew on each call, and not cached, so that
        # evaluating a fresh dataset every epoch keeps nothing alive.
        with self._input_errors():
            self._eval_loop(self._distribute(dataset) if full is dataset
                            else self.strategy.experimental_distribute_dataset(full))
        return lockstep.read_metrics(self.eval_metrics, name="eval metrics")

    def train_results(self, reset: bool = False) -> Dict[str, float]:
        """Training loss and metrics accumulated since the last reset."""
        results = lockstep.read_metrics(self.train_metrics, name="train metrics")
        if reset:
            for metric in self.train_metrics.values():
                metric.reset_state()
        return results

    # ------------------------------------------------------------------ compiled internals

    def _iterate(self, dataset):
        """An iterator over the training ``dataset`` for this strategy.

        A sharded stream is this worker's share already: with one replica per worker (CPU,
        Gaudi) it feeds the step as a plain, trackable iterator; several local replicas
        split it per replica. Any other stream is the global one, split by the strategy.
        """
        if not self.datasets.sharded:
            return iter(self._distribute(dataset))
        local_replicas = self.strategy.num_replicas_in_sync // \
            self.input_context.num_input_pipelines
        if local_replicas == 1:
            return iter(dataset)
        per_replica = self.config.batch_size // self.strategy.num_replicas_in_sync
        return iter(self.strategy.distribute_datasets_from_function(
            lambda _: dataset.unbatch().batch(per_replica, drop_remainder=True)))

    def _distribute(self, dataset):
        key = id(dataset)
        if key not in self._distributed:
            self._distributed[key] = (dataset, self.strategy.experimental_distribute_dataset(dataset))
        return self._distributed[key][1]

    def _forward(self, features, training: bool):
        outputs = self.model(features, training=training)
        if self.config.auto_cast_outputs:
            outputs = precision.cast_outputs(outputs)
        return outputs

    def _check_loss_shape(self, per_example, labels, features) -> None:
        contracts.check_loss_shape(per_example, labels, features, owner=type(self).__name__,
                                   micro=self.config.grad_accum_steps > 1)

    def _storm(self, max_consecutive_skips):
        """True once skipping non-finite steps no longer helps (see loop.fit_loop.storm_reason)."""
        consecutive = self.consecutive_skips.read_value()
        stop = consecutive >= max_consecutive_skips
        if self.loss_scaler.dynamic:
            stop = tf.logical_or(stop, tf.logical_and(consecutive > 0,
                                                      self.loss_scaler.scale <= 1.0))
        return stop

    def _train_loop_fn(self, iterator, num_steps, max_consecutive_skips):
        # The storm check is the loop's condition, so a run stops at exactly the step that
        # hit the limit, not at the end of its step loop.
        step = tf.constant(0, tf.int32)
        while step < num_steps and not self._storm(max_consecutive_skips):
            # The wait for the next batch, timed in the graph: the loop's stateful ops run in
            # program order, so the clock reads bracket the fetch and nothing else. (Op
            # determinism forbids reading the clock: then the wait is not measured.)
            timed = not self.config.deterministic
            asked = tf.timestamp() if timed else tf.constant(0.0, tf.float64)
            with tf.control_dependencies([asked]):
                batch = next(iterator) if iterator is not None else self.in_graph_input.batch(
                    self.global_step)
            if timed:
                with tf.control_dependencies(tf.nest.flatten(batch, expand_composites=True)):
                    self.input_wait_s.assign_add(tf.timestamp() - asked)
            skipped = self.strategy.run(self._replica_train_step, args=(batch,))
            # Gradients were all-reduced before the finiteness check, so every replica
            # agrees; the first local value stands for all.
            skipped = tf.cast(self.strategy.experimental_local_results(skipped)[0], tf.int64)
            self.skipped_steps.assign_add(skipped)
            self.consecutive_skips.assign(skipped * (self.consecutive_skips + 1))
            step += 1

    def _gradients_fn(self, features, labels):
        """Unscaled float32 gradients of one (micro-)batch, its per-example loss and outputs.

        A variable the loss does not depend on (an unused layer) gets None, not zeros: the
        update then leaves it alone, where zeros would still move it under weight decay or
        momentum.
        """
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self._forward(features, training=True)
            per_example = self.compute_loss(labels, outputs)
            self._check_loss_shape(per_example, labels, features)
            # Sum / global batch: summing over micro-batches and replicas gives the mean.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.config.batch_size)
            if self.model.losses:
                regularization = tf.add_n(self.model.losses) / self.config.grad_accum_steps
                loss += tf.nn.scale_regularization_loss(regularization)
            scaled_loss = self.loss_scaler.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        gradients = [None if g is None else tf.convert_to_tensor(g) for g in gradients]
        return self.loss_scaler.unscale_gradients(gradients), per_example, outputs

    def _replica_train_step(self, batch):
        features, labels = batch
        if self.config.grad_accum_steps == 1:
            gradients, per_example, outputs = self._gradients(features, labels)
            self._update_train_metrics(labels, outputs, per_example)
        else:
            gradients = self._accumulated_gradients(features, labels)
        # Only variables with a gradient take part: the others are not updated at all.
        pairs = [(g, v) for g, v in zip(gradients, self.model.trainable_variables)
                 if g is not None]
        gradients, variables = [g for g, _ in pairs], [v for _, v in pairs]
        if self.strategy.num_replicas_in_sync > 1:
            # Reduce before the finiteness check so every replica skips the same steps.
            gradients = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, gradients)
        if self.config.clip_norm:
            # After unscaling: the norm is that of the true gradient, not of the scaled one.
            gradients, _ = tf.clip_by_global_norm(gradients, self.config.clip_norm)
        return self.loss_scaler.apply_gradients(gradients, variables)

    def _accumulated_gradients(self, features, labels):
        """Summed float32 gradients of ``grad_accum_steps`` micro-batches, one at a time.

        Only one micro-batch's activations are alive at a time. None marks a variable without
        a gradient, as in ``_gradients_fn``.
        """
        k = self.config.grad_accum_steps
        micro_features = tf.nest.map_structure(lambda t: _split(t, k), features)
        micro_labels = tf.nest.map_structure(lambda t: _split(t, k), labels)
        variables = self.model.trainable_variables
        sums = [tf.zeros(v.shape, v.dtype) for v in variables]
        has_gradient: list = []  # Filled when the loop body is traced, before it is read below.
        for i in tf.range(k):
            sums = self._add_micro_batch(sums, micro_features, micro_labels, i, has_gradient)
        assert len(has_gradient) == len(sums), "the accumulation loop was not traced"
        return [s if used else None for s, used in zip(sums, has_gradient)]

    def _add_micro_batch(self, sums, micro_features, micro_labels, i, has_gradient: list):
        features = tf.nest.map_structure(lambda t: t[i], micro_features)
        labels = tf.nest.map_structure(lambda t: t[i], micro_labels)
        gradients, per_example, outputs = self._gradients(features, labels)
        self._update_train_metrics(labels, outputs, per_example)
        has_gradient[:] = [g is not None for g in gradients]
        return [s if g is None else s + g for s, g in zip(sums, gradients)]

    def _update_train_metrics(self, labels, outputs, per_example):
        self.train_metrics["loss"].update_state(per_example)
        self.update_metrics(self.train_metrics, labels, outputs)

    def _eval_loop_fn(self, dataset):
        for batch in dataset:
            self.strategy.run(self._replica_eval_step, args=(batch,))

    def _replica_eval_step(self, batch):
        features, labels, weights = batch
        outputs = self._forward(features, training=False)
        per_example = self.compute_loss(labels, outputs)
        self._check_loss_shape(per_example, labels, features)  # Evaluation may come first.
        self.eval_metrics["loss"].update_state(per_example, sample_weight=weights)
        self.update_metrics(weighted_metrics.weighted_views(self.eval_metrics, weights), labels,
                            outputs)
