"""The Trainer: compiled, loss-scaled train and eval steps with hooks for subclasses.

The public methods (``train_steps``, ``evaluate``) are fixed; subclasses override the
protected hooks (``build_datasets``, ``build_model``, ``build_optimizer``, ``compute_loss``,
``build_metrics``, ``update_metrics``). The base class owns the ``tf.function`` wrapping and
caching, the distribution strategy and loss scaling, so a subclass cannot get them wrong.
"""

from __future__ import annotations

from typing import Dict, Optional

from trainer import data, optimizers, precision, registry
from trainer.compat import keras, tf
from trainer.config import TrainConfig
from trainer.loss_scale import LossScaler


class Trainer:
    """Trains one model under one dtype policy with explicit loss scaling.

    Construction creates every variable (model weights, optimizer slots, loss-scale state,
    metrics) before the first trace, so tracing never creates state and a checkpoint can be
    restored into a fully built object.

    Args:
      config: the run configuration.
      strategy: a ``tf.distribute`` strategy; the default (no-op) strategy when None.
    """

    def __init__(self, config: TrainConfig, *, strategy: Optional[tf.distribute.Strategy] = None):
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        # Same seed, same initial weights and data order: runs under different policies are
        # comparable. Seed before the datasets: tf.data's shuffle seed combines with the global
        # seed, so seeding later made the order depend on whatever ran before in the process.
        keras.utils.set_random_seed(config.seed)
        self.datasets = self.build_datasets()
        if config.deterministic:
            # Bit-exact resume: deterministic kernels, and layer RNGs (dropout) held in
            # tf.random.Generator variables, which are saved with the model.
            tf.config.experimental.enable_op_determinism()
            keras.backend.experimental.enable_tf_random_generator()
        with self.strategy.scope():
            with precision.policy_scope(config.policy):
                self.model = self.build_model()
            sample = tf.zeros((1,) + tuple(self.datasets.input_shape), tf.float32)
            precision.check_output_dtypes(self.model, self.model(sample, training=False),
                                          policy=config.policy,
                                          auto_cast=config.auto_cast_outputs)
            inner_optimizer = self.build_optimizer()
            optimizers.fuse_updates(inner_optimizer)
            self.loss_scaler = LossScaler(inner_optimizer, mode=config.resolved_loss_scale)
            self.optimizer = self.loss_scaler.optimizer
            self.optimizer.build(self.model.trainable_variables)
            self.train_metrics = {"loss": keras.metrics.Mean(name="loss"), **self.build_metrics()}
            self.eval_metrics = {"loss": keras.metrics.Mean(name="loss"), **self.build_metrics()}
            counter = dict(initial_value=0, dtype=tf.int64, trainable=False,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.skipped_steps = tf.Variable(name="skipped_steps", **counter)
            self.consecutive_skips = tf.Variable(name="consecutive_skips", **counter)
        self._distributed: Dict[int, object] = {}
        self._train_iterator = None
        self._train_loop = tf.function(self._train_loop_fn)
        self._eval_loop = tf.function(self._eval_loop_fn)
        # XLA compiles the per-replica math (forward, loss, backward); the iterator, the
        # all-reduce and the optimizer update stay outside, where every strategy supports them.
        self._gradients = tf.function(self._gradients_fn, jit_compile=True) \
            if config.jit_compile else self._gradients_fn

    # ------------------------------------------------------------------ hooks

    def build_datasets(self) -> data.Datasets:
        """Returns the train/validation/test pipelines (runs eagerly, once).

        ``train`` must be infinite and yield ``(features, labels)`` batches of the **global**
        batch size; the strategy splits each batch across replicas.
        """
        arrays = data.load_arrays(self.config.dataset, data_dir=self.config.data_dir,
                                  seed=self.config.seed,
                                  synthetic_examples=self.config.synthetic_examples)
        return data.make_datasets(arrays, batch_size=self.config.batch_size,
                                  validation_split=self.config.validation_split,
                                  seed=self.config.seed)

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

        Runs in graph, once per replica. Return per-example values, not a mean: the base class
        sums them and divides by the **global** batch size, so that when the strategy sums the
        gradients of N replicas the result is the gradient of the global mean loss (a plain
        per-replica mean would make the update N times too large).
        """
        return keras.losses.sparse_categorical_crossentropy(labels, outputs)

    def build_metrics(self) -> Dict[str, keras.metrics.Metric]:
        """Returns fresh metrics (besides 'loss'); called twice, for training and evaluation."""
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy(name="accuracy")}

    def update_metrics(self, metrics: Dict[str, keras.metrics.Metric], labels, outputs) -> None:
        """Updates ``metrics`` for one batch; runs in graph, once per replica.

        Keras metrics keep float32 running sums (in bf16, 4096 + 1 == 4096) and are
        aggregated across replicas when read.
        """
        metrics["accuracy"].update_state(labels, outputs)

    # ------------------------------------------------------------------ state

    @property
    def global_step(self) -> tf.Variable:
        """Optimizer steps taken, skipped (non-finite) steps included."""
        return self.optimizer.iterations

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
            "optimizer": self.optimizer,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "train_metrics": tf.train.Checkpoint(**self.train_metrics),
        }
        # With `train_from` the input position follows from the global step (see
        # train_iterator). Otherwise the iterator itself is saved where it can be: a
        # tf.distribute iterator (any strategy but the default) is not trackable, so there a
        # resumed run restarts its data stream.
        if self.datasets.train_from is None and isinstance(
                self.train_iterator, tf.__internal__.tracking.Trackable):
            items["train_iterator"] = self.train_iterator
        return items

    @property
    def train_iterator(self):
        """The training input, created on first use at the global step's position.

        First use comes after any checkpoint restore, so a resumed run continues exactly where
        the saved one was: ``global_step * batch_size`` examples into the stream.
        """
        if self._train_iterator is None:
            dataset = self.datasets.train
            if self.datasets.train_from is not None:
                seen = int(self.global_step.numpy()) * self.config.batch_size
                dataset = self.datasets.train_from(seen)
            self._train_iterator = iter(self._distribute(dataset))
        return self._train_iterator

    def weights_checksum(self) -> float:
        """A float64 sum of every model weight, to compare runs."""
        return float(sum(tf.reduce_sum(tf.cast(w, tf.float64)).numpy() for w in self.model.weights))

    # ------------------------------------------------------------------ public, fixed

    def train_steps(self, num_steps: int) -> None:
        """Runs ``num_steps`` train steps in one compiled call (an in-graph loop).

        The count goes in as a tensor, so a new value does not retrace.
        """
        self._train_loop(self.train_iterator, tf.constant(num_steps, tf.int32))

    def evaluate(self, dataset: tf.data.Dataset) -> Dict[str, float]:
        """Returns the mean loss and metrics over the finite ``dataset``."""
        for metric in self.eval_metrics.values():
            metric.reset_state()
        self._eval_loop(self._distribute(dataset))
        return {name: float(m.result()) for name, m in self.eval_metrics.items()}

    def train_results(self, reset: bool = False) -> Dict[str, float]:
        """Training loss and metrics accumulated since the last reset."""
        results = {name: float(m.result()) for name, m in self.train_metrics.items()}
        if reset:
            for metric in self.train_metrics.values():
                metric.reset_state()
        return results

    # ------------------------------------------------------------------ compiled internals

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

    def _train_loop_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            skipped = self.strategy.run(self._replica_train_step, args=(next(iterator),))
            if self.loss_scaler.dynamic:
                # Gradients were all-reduced before the finiteness check, so every replica
                # agrees; the first local value stands for all.
                skipped = tf.cast(self.strategy.experimental_local_results(skipped)[0], tf.int64)
                self.skipped_steps.assign_add(skipped)
                self.consecutive_skips.assign(skipped * (self.consecutive_skips + 1))

    def _gradients_fn(self, features, labels):
        """Unscaled float32 gradients of one (micro-)batch, its per-example loss and outputs."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            outputs = self._forward(features, training=True)
            per_example = self.compute_loss(labels, outputs)
            # Sum / global batch: summing over micro-batches and replicas gives the mean.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.config.batch_size)
            if self.model.losses:
                regularization = tf.add_n(self.model.losses) / self.config.grad_accum_steps
                loss += tf.nn.scale_regularization_loss(regularization)
            scaled_loss = self.loss_scaler.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        gradients = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                     for g, v in zip(gradients, variables)]
        return self.loss_scaler.unscale_gradients(gradients), per_example, outputs

    def _replica_train_step(self, batch):
        features, labels = batch
        accum_steps = self.config.grad_accum_steps
        if accum_steps == 1:
            gradients, per_example, outputs = self._gradients(features, labels)
            self._update_train_metrics(labels, outputs, per_example)
        else:
            # k micro-batches, one at a time (activations of one micro-batch in memory); their
            # unscaled float32 gradients are summed, then one finite check and one update.
            split = lambda t: tf.reshape(t, [accum_steps, -1] + t.shape[1:].as_list())  # noqa: E731
            micro_features = tf.nest.map_structure(split, features)
            micro_labels = tf.nest.map_structure(split, labels)
            gradients = [tf.zeros_like(v) for v in self.model.trainable_variables]
            for i in tf.range(accum_steps):
                f_i = tf.nest.map_structure(lambda t: t[i], micro_features)  # noqa: B023
                l_i = tf.nest.map_structure(lambda t: t[i], micro_labels)  # noqa: B023
                micro_gradients, per_example, outputs = self._gradients(f_i, l_i)
                gradients = [a + g for a, g in zip(gradients, micro_gradients)]
                self._update_train_metrics(l_i, outputs, per_example)
        if self.strategy.num_replicas_in_sync > 1:
            # Reduce before the finiteness check so every replica skips the same steps.
            gradients = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, gradients)
        if self.config.clip_norm:
            # After unscaling: the norm is that of the true gradient, not of the scaled one.
            gradients, _ = tf.clip_by_global_norm(gradients, self.config.clip_norm)
        return self.loss_scaler.apply_gradients(gradients, self.model.trainable_variables)

    def _update_train_metrics(self, labels, outputs, per_example):
        self.train_metrics["loss"].update_state(per_example)
        self.update_metrics(self.train_metrics, labels, outputs)

    def _eval_loop_fn(self, dataset):
        for batch in dataset:
            self.strategy.run(self._replica_eval_step, args=(batch,))

    def _replica_eval_step(self, batch):
        features, labels = batch
        outputs = self._forward(features, training=False)
        self.eval_metrics["loss"].update_state(self.compute_loss(labels, outputs))
        self.update_metrics(self.eval_metrics, labels, outputs)
