"""Backbone stage: timm models with resolved pretrained weights, their feature maps, freezing, preprocessing."""

from fmtransfer.backbone.convolution import depthwise_backward_in_float32
from fmtransfer.backbone.model import (
    PRE_LOGITS,
    BackboneSpec,
    FeatureMapExtractor,
    FixedBatchNormStats,
    FrozenModule,
    LevelInfo,
    check_model_name,
    describe_backbone,
    describe_levels,
    parse_levels,
    preparation_seconds,
    to_channels_last,
)
from fmtransfer.backbone.split import SUFFIX_BUILDERS, build_suffix, split_level
from fmtransfer.backbone.transforms import (
    SeededView,
    augment_settings,
    build_eval_transform,
    build_train_transform,
    merge_augment,
    resolve_data_config,
)
from fmtransfer.backbone.weights import (
    PACKAGED_WEIGHTS,
    WeightsInfo,
    WeightsSource,
    load_weights,
    resolve_weights_source,
    state_dict_checksum,
)

__all__ = [
    "PACKAGED_WEIGHTS",
    "PRE_LOGITS",
    "SUFFIX_BUILDERS",
    "BackboneSpec",
    "FeatureMapExtractor",
    "FixedBatchNormStats",
    "FrozenModule",
    "LevelInfo",
    "SeededView",
    "WeightsInfo",
    "WeightsSource",
    "augment_settings",
    "build_eval_transform",
    "build_suffix",
    "build_train_transform",
    "check_model_name",
    "depthwise_backward_in_float32",
    "describe_backbone",
    "describe_levels",
    "load_weights",
    "merge_augment",
    "parse_levels",
    "preparation_seconds",
    "resolve_data_config",
    "resolve_weights_source",
    "split_level",
    "state_dict_checksum",
    "to_channels_last",
]
