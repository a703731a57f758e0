"""Webdataset shard sets, the public face: everything a command or a test needs from the five modules that do
the work, one job each (the format is documented in ``shards/README.md``):

- ``shard_format``:  constants, sample keys, image encoding and checks, reading tars, DALI's index files;
- ``shard_sources``: Fashion-MNIST, scikit-learn's digits, class folders, other webdataset tars;
- ``shard_jobs``:    one shard as a job (read + encode its images, tar, index, ``.done`` record), whether an
  interrupted run finished it (resume), the worker processes;
- ``shard_writer``:  ``make_shards`` (shuffled split -> shard jobs -> manifest, written last), the embedded
  Fashion-MNIST set;
- ``manifest``:      ``load_manifest`` (checked against the files) and ``validate_shards``.
"""
from scale_refiner.atomic import atomic_path, atomic_write, sha256_file  # noqa: F401
from scale_refiner.data.manifest import (ShardSet, ShardSplit, ValidationReport, load_manifest,  # noqa: F401
                                         validate_shards)
from scale_refiner.data.shard_jobs import DONE_SUFFIX, ShardJob, ShardWorkers, default_workers  # noqa: F401
from scale_refiner.data.shard_format import (FORMAT_NAME, FORMAT_VERSION, IMAGE_EXTS, INDEX_VERSION,  # noqa: F401
                                             LABEL_EXTS, MANIFEST, SPLITS, PathLike, Sample, ShardError,
                                             TruncatedTarError, FileImage, TarImage, check_image_bytes,
                                             encode_array, index_entries, read_image,
                                             iter_tar_samples, normalize_image_bytes, read_index_file, split_key,
                                             write_dali_index, write_index_file)
from scale_refiner.data.shard_sources import (SourceData, source_digits, source_fashion_mnist,  # noqa: F401
                                              source_folder, source_tar)
from scale_refiner.data.shard_writer import (EMBEDDED_DATASET, SHARD_ROOT_ENV,  # noqa: F401
                                             ensure_fashion_mnist_shards, make_shards, shard_root, split_jobs,
                                             write_split)
