"""Data: sources (text, images, audio), splits, per-host shards, tokenisation, image transforms, batching.

Batches are ``dict[str, np.ndarray]`` in host memory with a ``"mask"`` key;
training iterators are resumable (``get_state`` / ``set_state``), evaluation
iterators cover every example exactly once. See ``iterators.py`` for the contract.
"""

from jaxfer.data import augment
from jaxfer.data.augment import Augment
from jaxfer.data.audio import AudioSource, CharVocab, read_audio_csv, read_wav, transcribe
from jaxfer.data.buckets import Buckets
from jaxfer.data.image import (IMAGENET_MEAN, IMAGENET_STD, center_crop, image_transform,
                               mixup, normalize, random_resized_crop_box, resize, transform_options)
from jaxfer.data.iterators import EvalBatches, Prefetch, TrainIterator
from jaxfer.data.mixture import EvalChain, Mixture, mixture_sizes
from jaxfer.data.pipeline import (SOURCES, SourceKind, make_pipeline, make_source, pipeline,
                                  process_info, read_source, shard, source_from_config, source_kind,
                                  split_source)
from jaxfer.data.elpv import read_elpv
from jaxfer.data.sources import (ArraySource, ImageFileSource, ImageFolderSource, encode_labels,
                                 from_arrays, gather, read_image, read_image_folder, stack)
from jaxfer.data.tables import from_records, read_csv, read_jsonl
from jaxfer.data.split import local_batch_size, shard_indices, shard_sizes, split_indices
from jaxfer.data.text import (check_token_ids, fit_max_length, load_tokenizer, tokenize,
                              tokenize_text_to_text, tokenize_texts)
from jaxfer.data.tfds_source import TfdsSource
