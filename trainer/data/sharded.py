"""Datasets streamed from record files: never held whole, sharded by file across workers.

:func:`from_files` builds the pipelines for any record schema (your ``parse`` function);
:func:`image_parser` is the parse function of the ImageNet / TF-models image layout that
``--dataset=tfrecord:GLOB`` uses (``trainer/data/write_shards.py`` writes it).

The training stream of one worker, per epoch: its files (every ``num_workers``-th of the
sorted list, from its own index) in an order drawn from (seed, epoch, worker), read
``cycle_length`` at a time, interleaved record by record, each window of ``shuffle_buffer``
records permuted by a stateless draw;
the first ``steps_per_epoch * local_batch`` records are parsed (in parallel, order kept) with
a per-record seed of (seed, epoch, record index) for the augmentation, and batched. Every
worker runs the same ``steps_per_epoch`` (the smallest share decides), so workers stay in
lockstep; the records of a larger share beyond it are left out of that epoch.

Exact resume: the iterator over this stream is checkpointed (``tf.train.Checkpoint``: file
offsets, the shuffle buffer and the batches read ahead) by each worker, so a resumed run
continues with the very next batch and reads no record twice. ``train_from(n)`` replays a
position by reading and skipping the epoch's records so far; the Trainer falls back to it only
where no iterator state was saved.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional, Sequence, Tuple, Union

from trainer.compat import tf
from trainer.data import records
from trainer.data.pipelines import Datasets, full_batches
from trainer.errors import UserError

Parse = Callable[[tf.Tensor, Optional[tf.Tensor]], Tuple[tf.Tensor, tf.Tensor]]

# Marker in the message of our in-graph check of a record (:func:`checked_label`), so that
# :func:`find_bad_record` can show its values without TensorFlow's framing.
RECORD_ERROR = "bad record: "


def _files(spec: Union[str, Sequence[str]], flag: str) -> list:
    if isinstance(spec, str):
        return records.expand(spec, flag=flag)
    files = [str(f) for f in spec]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise UserError(f"{flag}: {missing[0] if missing else 'no files given'} is not a file")
    return files


@dataclasses.dataclass(frozen=True)
class _Split:
    shards: Tuple[records.Shard, ...]

    @property
    def paths(self):
        return [s.path for s in self.shards]

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)


def _read(paths, cycle_length: int, deterministic: bool) -> tf.data.Dataset:
    """The records of ``paths``, interleaved ``cycle_length`` files at a time."""
    files = tf.data.Dataset.from_tensor_slices(paths)
    if cycle_length == 1:
        return files.flat_map(tf.data.TFRecordDataset)
    return files.interleave(tf.data.TFRecordDataset, cycle_length=cycle_length, block_length=1,
                            num_parallel_calls=cycle_length, deterministic=deterministic)


def from_files(train: Union[str, Sequence[str]], *, parse: Parse, batch_size: int,
               test: Union[str, Sequence[str]],
               validation: Union[str, Sequence[str], None] = None, seed: int = 0,
               num_classes: int = 0, input_context: Optional[tf.distribute.InputContext] = None,
               shuffle_buffer: int = 1024, cycle_length: int = 4,
               parallel_calls: int = 0, deterministic: bool = True,
               source: Optional[str] = None) -> Datasets:
    """Pipelines that stream TFRecord files: the set is never held in memory.

    Args:
      train: the training files, a glob or a list (sorted order is the data order).
      parse: ``parse(record, seed) -> (features, target)`` for one serialized record, in
        graph. ``seed`` is a ``[2]`` int64 tensor unique to (run seed, epoch, record) for
        training records (use it with ``tf.image.stateless_*`` so augmentation is
        reproducible and resumes exactly) and None for evaluation records. Features need a
        static shape.
      batch_size: the global batch size; each worker's stream yields its share
        (``input_context.get_per_replica_batch_size`` x its replicas).
      test: the evaluation files (a glob or a list).
      validation: the files evaluated after each epoch (a glob or a list; default none).
      seed: the data-order and augmentation seed.
      num_classes: passed on to the model (0 for regression).
      input_context: this worker's place in the job (the Trainer's ``input_context``);
        None for one worker.
      shuffle_buffer: records shuffled together: each window of this many records (as read,
        interleaved from ``cycle_length`` files) is permuted (their bytes are part of each
        checkpoint's input state).
      cycle_length: files read at a time, interleaved record by record.
      parallel_calls: parse calls in parallel (0: two per CPU core; measured faster than
        tf.data's AUTOTUNE on this pipeline, whose shuffle windows arrive in bursts).
      deterministic: keep the record order whatever the parse timing (needed for a
        bit-identical resume; off lets a slow record be overtaken).
      source: what the banner and metrics file call the data (default: the glob).

    Raises:
      UserError: no files, a file that is not TFRecord or is truncated (checked from the
        headers of every file before training), fewer training files than workers, or too
        few records for one batch per worker.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("shuffle_buffer", shuffle_buffer, 1),
                             ("cycle_length", cycle_length, 1), ("parallel_calls", parallel_calls, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"from_files: {name} must be an integer >= {low}, got {value!r}")
    context = input_context or tf.distribute.InputContext()
    workers, worker = context.num_input_pipelines, context.input_pipeline_id
    train_files = _files(train, "--dataset")
    test_split = _Split(records.index(_files(test, "--eval_data")))
    all_train = records.index(train_files)
    if validation is not None:
        validation_files = _files(validation, "validation")
        validation = test_split if validation_files == test_split.paths else \
            _Split(records.index(validation_files))
    if len(all_train) < workers:
        raise UserError(
            f"{len(all_train)} training files for {workers} workers: each worker reads its own "
            "files; write at least as many shards as workers (python -m trainer.data.write_shards "
            "--shards=N)")
    if batch_size % workers:
        raise UserError(f"batch_size {batch_size} does not split evenly across {workers} workers")
    local_batch = batch_size // workers
    shares = [_Split(all_train[w::workers]) for w in range(workers)]
    steps_per_epoch = min(s.records for s in shares) // local_batch
    if steps_per_epoch < 1:
        smallest = min(s.records for s in shares)
        raise UserError(f"batch_size {batch_size} needs {local_batch} records per worker, but a "
                        f"worker's files hold {smallest}; lower --batch_size or write more data")
    mine = shares[worker]
    per_epoch = steps_per_epoch * local_batch
    parallel = parallel_calls or 2 * (os.cpu_count() or 1)
    cycle = min(cycle_length, len(mine.shards))
    paths = tf.constant(mine.paths)
    seed64 = tf.constant(seed, tf.int64)

    def epoch_records(epoch):
        # Everything about an epoch follows from (seed, epoch, worker): the file order, the
        # shuffle and each record's augmentation seed. The shuffle permutes windows of
        # `shuffle_buffer` records with stateless draws: a position in the epoch is a pure
        # function of the position (so `train_from` skips exactly), and unlike
        # `Dataset.shuffle` inside `flat_map` its state can be checkpointed.
        stream = seed64 * 1000003 + epoch * workers + worker
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(mine.shards)), tf.stack([stream, tf.constant(-1, tf.int64)]))

        def permute(window, records_):
            perm = tf.random.experimental.stateless_shuffle(tf.range(tf.size(records_)),
                                                            tf.stack([stream, window]))
            return tf.gather(records_, perm)

        return (_read(tf.gather(paths, order), cycle, deterministic)
                .batch(shuffle_buffer).enumerate().map(permute).unbatch()
                .take(per_epoch)
                .enumerate()
                .map(lambda i, record: (record, tf.stack([seed64 * 1000003 + epoch, i]))))

    def stream(first_epoch: int, skip: int) -> tf.data.Dataset:
        epochs = tf.data.Dataset.range(first_epoch, 2 ** 62)
        return (epochs.flat_map(lambda e: epoch_records(e).skip(
                    tf.where(e == first_epoch, tf.constant(skip, tf.int64), 0)))
                .map(parse, num_parallel_calls=parallel,
                     deterministic=deterministic)
                .batch(local_batch, drop_remainder=True)
                .prefetch(tf.data.AUTOTUNE))

    def train_from(examples_seen: int) -> tf.data.Dataset:
        # examples_seen counts the global batches: this worker's share of them.
        first_epoch, offset = divmod(int(examples_seen) // workers, per_epoch)
        if offset:
            print(f"note: resuming the training files by reading and skipping {offset} records "
                  "(no saved input state for this step)", flush=True)
        return stream(first_epoch, offset)

    def finite(split: _Split) -> tf.data.Dataset:
        dataset = (_read(split.paths, 1, True)
                   .map(lambda record: parse(record, None), num_parallel_calls=parallel,
                        deterministic=True)
                   .batch(batch_size))
        options = tf.data.Options()
        # Every worker reads the whole evaluation set and keeps its share of each padded
        # batch (as for in-memory data): splitting by file would give workers unequal steps.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return full_batches(dataset.with_options(options), batch_size)

    train_stream = stream(0, 0)
    features = tf.nest.flatten(train_stream.element_spec[0])[0]
    if not features.shape[1:].is_fully_defined():
        raise UserError(f"from_files: parse gives features of shape {features.shape[1:]}; every "
                        "dimension must be static (resize or crop to a fixed size)")
    explain_paths = mine.paths + (validation.paths if validation else []) + test_split.paths
    fingerprint = {os.path.basename(s.path): [s.size, s.records]
                   for split in (all_train, test_split.shards) for s in split}
    return Datasets(
        train=train_stream, train_from=train_from, validation=finite(validation) if validation
        else None, test=finite(test_split), steps_per_epoch=steps_per_epoch,
        input_shape=tuple(features.shape[1:].as_list()), num_classes=num_classes,
        num_train=steps_per_epoch * batch_size,
        num_validation=validation.records if validation else 0, num_test=test_split.records,
        source=source or os.path.dirname(os.path.abspath(train_files[0])),
        sharded=True, checkpoint_iterator=True, fingerprint=fingerprint,
        explain=lambda error: find_bad_record(explain_paths, parse))


def find_bad_record(paths: Sequence[str], parse: Parse) -> Optional[str]:
    """One line naming the first record of ``paths`` that ``parse`` fails on, else None.

    Run after a TensorFlow error while reading (an undecodable image, a missing feature, a
    label out of range are found only when the record is parsed): the files are read again,
    record by record, up to the first bad one. Slow on a big set, but only on that path.
    """
    for path in paths:
        dataset = tf.data.TFRecordDataset(path).map(lambda r: parse(r, None))
        index = 0
        try:
            for _ in dataset:
                index += 1
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
            return (f"{path}: record {index}: {_tf_message(error)}; fix or rewrite that file "
                    "(python -m trainer.data.write_shards), or leave it out of the glob")
    return None


def _tf_message(error: Exception) -> str:
    """TensorFlow's message without its graph annotations (first line, no node names)."""
    text = getattr(error, "message", str(error)).strip().splitlines()[0]
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"^Error in user-defined function passed to .*? transformation with "
                  r"iterator: \S+: ", "", text)
    text = text.split("\t [[")[0].split(" [[")[0].split(" [Op:")[0].strip()
    ours = re.search(re.escape(RECORD_ERROR) + r"(.*?)\] \[(-?\d+)\] \[(.*)\]", text)
    if ours:  # Our in-graph check (Assert prints each of its values in brackets).
        text = " ".join(ours.groups())
    return text.rstrip(".")


# ------------------------------------------------------------------ the image layout


def image_parser(*, image_size: int, channels: int, num_classes: int, label_offset: int = 0,
                 augment: bool = True, image_key: str = "image/encoded",
                 label_key: str = "image/class/label") -> Parse:
    """The parse function of image-classification records (JPEG or PNG, ImageNet layout).

    Training records (a seed is given): the image is resized so its shorter side is
    ``image_size * 8 / 7`` (ImageNet's 256 for 224), cropped to ``image_size`` square at a
    random place and flipped left-right at random (both from the record's seed); without
    ``augment``, and for evaluation, the crop is central. Pixels become float32 in [0, 1]
    (the image contract of in-memory data). An image already ``image_size`` square is not
    resized when not augmented, so shards of a dataset train exactly as its arrays.

    Labels are ``label - label_offset`` as int32, checked to be in ``[0, num_classes)``.
    """
    scaled = max(image_size, round(image_size * 8 / 7))

    def parse(record, seed):
        parsed = tf.io.parse_single_example(record, {
            image_key: tf.io.FixedLenFeature([], tf.string),
            label_key: tf.io.FixedLenFeature([], tf.int64)})
        image = tf.io.decode_image(parsed[image_key], channels=channels, expand_animations=False)
        label = checked_label(tf.cast(parsed[label_key] - label_offset, tf.int32),
                              num_classes, label_offset,
                              f"--num_classes={num_classes}, --label_offset={label_offset}")
        shape = tf.shape(image)
        exact = tf.logical_and(shape[0] == image_size, shape[1] == image_size)
        if seed is None or not augment:
            image = tf.cond(exact, lambda: tf.cast(image, tf.float32),
                            lambda: tf.image.resize_with_crop_or_pad(  # A central crop.
                                _resize_shorter(image, scaled), image_size, image_size))
        else:
            image = _resize_shorter(image, scaled)
            image = tf.image.stateless_random_crop(image, [image_size, image_size, channels], seed)
            image = tf.image.stateless_random_flip_left_right(image, seed + 1)
        image = tf.ensure_shape(image * (1.0 / 255.0), [image_size, image_size, channels])
        return image, label
    return parse


def checked_label(label, num_classes: int, offset: int, hint: str):
    """``label``, after an in-graph check that it is in ``[0, num_classes)`` (the stored
    value, ``label + offset``, is what the error names; see :func:`find_bad_record`)."""
    check = tf.debugging.Assert(
        tf.logical_and(label >= 0, label < num_classes),
        [f"{RECORD_ERROR}label", label + offset,
         f"outside [{offset}, {num_classes + offset}) ({hint})"])
    with tf.control_dependencies([check]):
        return tf.identity(label)


def _resize_shorter(image, size: int):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    return tf.image.resize(image, new, antialias=True)


def first_image(path: str, image_key: str = "image/encoded") -> Tuple[int, int, int]:
    """(height, width, channels) of the first record's image in ``path``.

    Raises:
      UserError: when the record has no ``image_key`` or its image cannot be decoded.
    """
    record = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    if record is None:
        raise UserError(f"{path} holds no records")
    example = tf.train.Example.FromString(record.numpy())
    if image_key not in example.features.feature:
        keys = ", ".join(sorted(example.features.feature)) or "none"
        raise UserError(f"{path}: record 0 has no '{image_key}' feature (it has: {keys}); "
                        "write image shards with python -m trainer.data.write_shards")
    try:
        shape = tf.shape(tf.io.decode_image(
            example.features.feature[image_key].bytes_list.value[0], expand_animations=False))
    except tf.errors.InvalidArgumentError:
        raise UserError(f"{path}: record 0: its image cannot be decoded (not JPEG, PNG, GIF "
                        "or BMP); write it again") from None
    return tuple(int(d) for d in shape.numpy())


def eval_files(pattern: str, eval_data: str) -> str:
    """The evaluation glob: ``eval_data``, else the training glob with 'train' in its file
    name part replaced by 'validation', then 'test' (ImageNet's ``train-*`` / ``validation-*``).

    Raises:
      UserError: when neither is given nor found.
    """
    if eval_data:
        return eval_data
    folder, name = os.path.split(pattern)
    if "train" in name:
        for other in ("validation", "test"):
            candidate = os.path.join(folder, name.replace("train", other))
            if records.glob_has_files(candidate):
                return candidate
    raise UserError(f"no evaluation files for --dataset=tfrecord:{pattern}: pass --eval_data=GLOB "
                    "(files named like the training files with 'validation' or 'test' in place "
                    "of 'train' are found by themselves)")


def class_count(paths: Sequence[str], num_classes: int, label_offset: int,
                label_key: str = "image/class/label") -> int:
    """``num_classes``, else the lines of ``labels.txt`` beside the first file, else the
    largest label of the files (read once, with a note) + 1 - ``label_offset``."""
    if num_classes:
        return num_classes
    labels_file = os.path.join(os.path.dirname(paths[0]), "labels.txt")
    if os.path.isfile(labels_file):
        with open(labels_file) as f:
            return sum(1 for line in f if line.strip())
    print(f"note: counting the classes by reading the labels of {len(paths)} files (no "
          f"labels.txt beside them); pass --num_classes=K to skip this", flush=True)
    feature = {label_key: tf.io.FixedLenFeature([], tf.int64)}
    labels = tf.data.TFRecordDataset(list(paths)).map(
        lambda r: tf.io.parse_single_example(r, feature)[label_key])
    try:
        largest = int(labels.reduce(tf.constant(-1, tf.int64), tf.maximum))
    except tf.errors.InvalidArgumentError:
        raise UserError(f"the records of {paths[0]}... have no int64 '{label_key}' feature; "
                        "pass --num_classes, or write image shards with python -m "
                        "trainer.data.write_shards") from None
    return largest + 1 - label_offset


def image_shape(train: Union[str, Sequence[str]], image_size: int, num_classes: int,
                label_offset: int) -> Tuple[Tuple[int, int, int], int]:
    """(input shape, classes) of image shards (a glob or the files): the first image decides
    channels (and the size, where ``image_size`` is 0 and it is square)."""
    files = _files(train, "--dataset")
    height, width, channels = first_image(files[0])
    if channels not in (1, 3):
        channels = 3  # Grey+alpha or RGBA: decoded as RGB.
    if not image_size:
        if height != width:
            raise UserError(f"{files[0]} holds {height}x{width} images; pass --image_size=N to "
                            "train on N x N crops")
        image_size = height
    return (image_size, image_size, channels), class_count(files, num_classes, label_offset)


def from_tfrecord(pattern: str, *, batch_size: int, eval_data: str = "", image_size: int = 0,
                  num_classes: int = 0, label_offset: int = 0, augment: bool = True,
                  validation_split: float = 0.0, seed: int = 0,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  parallel_calls: int = 0, deterministic: bool = True) -> Datasets:
    """``--dataset=tfrecord:GLOB``: image-classification shards (see :func:`image_parser`).

    The evaluation files (:func:`eval_files`) are evaluated after each epoch as the
    validation set (``validation_split`` > 0; 0: no per-epoch validation) and at the end as
    the test set.
    """
    files = records.expand(pattern)  # Once: the shape, the classes and the stream use it.
    shape, classes = image_shape(files, image_size, num_classes, label_offset)
    if classes < 1:
        raise UserError(f"the labels of {pattern} minus --label_offset={label_offset} leave no "
                        "class; check --label_offset")
    parse = image_parser(image_size=shape[0], channels=shape[2], num_classes=classes,
                         label_offset=label_offset, augment=augment)
    evaluation = eval_files(pattern, eval_data)
    # ImageNet's convention: its validation files are evaluated after each epoch and at the
    # end (a split of the training records would mean reading them all first).
    return from_files(files, parse=parse, batch_size=batch_size, test=evaluation,
                      validation=evaluation if validation_split else None,
                      seed=seed, num_classes=classes, input_context=input_context,
                      parallel_calls=parallel_calls, deterministic=deterministic)
