"""gradleak's leakage metrics: plain functions with checked inputs ((N, C, H, W) images in
[0, 1]), one matching rule for all of them, and `score` that reports mean and worst case."""

from service.metrics.catalog import METRICS, Metric, MetricOptions, metric_catalog
from service.metrics.checks import check_images
from service.metrics.image import PSNR_CAP_DB, SSIM_WINDOW, mse, psnr, psnr_from_mse, ssim
from service.metrics.labels import label_accuracy, label_multiset_accuracy, label_positional_accuracy
from service.metrics.matching import MATCHING_RULE, match_reconstructions, pairwise_mse
from service.metrics.perceptual import (
    LPIPS_MIN_SIDE,
    LPIPS_NETS,
    backbone_filename,
    clear_lpips_cache,
    find_backbone_checkpoint,
    get_lpips_net,
    lpips,
    weight_search_dirs,
)
from service.metrics.score import score

__all__ = [
    "LPIPS_MIN_SIDE",
    "LPIPS_NETS",
    "MATCHING_RULE",
    "METRICS",
    "PSNR_CAP_DB",
    "SSIM_WINDOW",
    "Metric",
    "MetricOptions",
    "backbone_filename",
    "check_images",
    "clear_lpips_cache",
    "find_backbone_checkpoint",
    "get_lpips_net",
    "label_accuracy",
    "label_multiset_accuracy",
    "label_positional_accuracy",
    "lpips",
    "match_reconstructions",
    "metric_catalog",
    "mse",
    "pairwise_mse",
    "psnr",
    "psnr_from_mse",
    "score",
    "ssim",
    "weight_search_dirs",
]
