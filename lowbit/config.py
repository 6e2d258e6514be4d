"""Every verb's configuration, in one place: each is what `lowbit <verb>` builds from its flags and what the Python
API (lowbit.api) and the study (lowbit.study) take. One vocabulary: a target is a `TargetName`, weights are set by
`WeightOptions` (weight_clip, rounding, weight_range), calibration images are a `DataConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lowbit.data.datasets import Dataset, load_dataset
from lowbit.errors import LowbitError
from lowbit.finetune.blockwise import AdaRoundConfig, get_recipe
from lowbit.quantize.manifest import WeightOptions
from lowbit.quantize.onnx_ptq import ActivationCalibration
from lowbit.targets import DEFAULT_TARGET, TargetName


class DataConfig(BaseModel):
    path: str
    images: str | None = None  # image folder, when `path` is a COCO json elsewhere
    max_images: int | None = None
    seed: int | None = 0

    def load(self) -> Dataset:
        return load_dataset(self.path, self.images).subset(self.max_images, self.seed)


class EvalConfig(BaseModel):
    model: str
    data: DataConfig
    imgsz: int | None = Field(None, gt=0)  # default: a graph's own static input size, else 640
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None
    # torch, onnxruntime, openvino or openvino-f32 (lowbit.evaluate.runners); default: torch for a PyTorch model,
    # onnxruntime for an .onnx, openvino for an OpenVINO IR
    runtime: str | None = None
    # a graph lowbit did not export: its preprocessing and decoder (lowbit.models.onnx_detector), over the model
    # card beside it
    preprocess: str | None = None
    decoder: str | None = None


class QuantizeConfig(WeightOptions):
    model: str
    # format names (uniform, each its own checkpoint), or manifest files (`lowbit search`, a study, hand-written):
    # a name ending in .json is a manifest, materialized layer by layer as it says
    formats: list[str] = Field(default_factory=lambda: ["W8A8"])
    calib: DataConfig
    eval: DataConfig | None = None
    imgsz: int = Field(640, gt=0)
    calib_batch: int = 8
    eval_batch: int = 1
    algorithm: str = "max"
    # weight_clip, rounding, weight_range (lowbit.quantize.manifest.WeightOptions): max clip and GPTQ rounding
    # from full-range scales by default
    device: str = "cpu"
    save: bool = True


class CompareConfig(BaseModel):
    runs: list[str] = Field(min_length=2)  # `lowbit eval` run folders; the first is the reference
    replicates: int = Field(500, ge=100)  # random halves of the images
    seed: int = 0


class SensitivityConfig(WeightOptions):
    model: str
    calib: DataConfig
    methods: list[str] = Field(default_factory=lambda: ["distortion"])
    formats: list[str] = Field(default_factory=lambda: ["W4A16", "W8A16"])
    batch: int = 8
    imgsz: int | None = Field(None, gt=0)  # default: an ONNX graph's own input size, else 640
    device: str = "cpu"
    layers: list[str] | None = None  # glob patterns; default: every quantizable layer
    top_k: int = 10
    # weight_clip, rounding, weight_range: how probed layers' weights are set (the gradient method uses ModelOpt's
    # max)
    target: TargetName = DEFAULT_TARGET  # the onnx method encodes INT8 activations as this target does
    preprocess: str | None = None  # an .onnx lowbit did not export: how it takes images, over its model card


class ExportConfig(BaseModel):
    checkpoint: str  # a lowbit checkpoint folder (modelopt.pth + manifest.json)
    onnx: str | None = None  # the .onnx to write (default: model.onnx in the run folder)
    target: TargetName = DEFAULT_TARGET  # lowbit.targets: how activations are encoded and placed
    # images to calibrate activation ranges on the exported graph (None: ModelOpt's calibrated ranges)
    calib: DataConfig | None = None
    calibration: ActivationCalibration = Field(default_factory=ActivationCalibration)
    parity: DataConfig | None = None  # images to compare ONNX Runtime with the fake-quant model on


class QuantizeOnnxConfig(BaseModel):
    model: str  # a float .onnx detector
    onnx: str | None = None  # the Q/DQ .onnx to write (default: model.onnx in the run folder)
    formats: str | None = None  # one format for every conv (a DFL decoder excluded) ...
    manifest: str | None = None  # ... or a manifest file (layer names as the graph's: `lowbit layers -m MODEL.onnx`)
    target: TargetName = DEFAULT_TARGET
    calib: DataConfig | None = None  # calibration images, for activation formats
    imgsz: int | None = Field(None, gt=0)  # default: the graph's own input size
    calibration: ActivationCalibration = Field(default_factory=ActivationCalibration)
    preprocess: str | None = None  # how the graph takes images (lowbit.models.onnx_detector), over its model card
    # weight rounding of a uniform format on the graph: GPTQ on the calibration images' conv inputs, or to nearest;
    # default: GPTQ where calibration images are given, else nearest; a manifest carries its own
    rounding: Literal["gptq", "nearest"] | None = None


class FinetuneRunConfig(BaseModel):
    checkpoint: str  # a lowbit checkpoint folder (modelopt.pth + manifest.json)
    train: DataConfig  # training images (unlabelled is fine); never an evaluation image
    eval: DataConfig | None = None  # before/after mAP; must not share an image with `train`
    recipe: str = "mixed"  # lowbit.finetune.blockwise.RECIPES: "mixed" (mixed INT4/INT8 schemes) or "w4" (uniform INT4)
    config: AdaRoundConfig | None = None  # overrides the recipe, whole
    device: str = "cpu"
    eval_batch: int = 8

    def algorithm(self) -> AdaRoundConfig:
        return get_recipe(self.recipe, self.config)


class BenchConfig(BaseModel):
    models: list[str] = Field(min_length=1)  # .onnx files or OpenVINO IRs; the first is the speed-up baseline
    threads: int | None = None
    reps: int = Field(30, ge=1)
    warmup: int = Field(5, ge=0)
    # real images on which every runtime's detections are checked against ONNX Runtime's before timing
    # (None: the COCO images lowbit carries); verify_images of them
    verify: DataConfig | None = None
    verify_images: int = Field(8, ge=0)  # 0: no output check (the table then says so)
    throughput_rounds: int = Field(0, ge=0)  # interleaved rounds of throughput on OpenVINO (0: latency only)
    preprocess: str | None = None  # graphs lowbit did not export: how they take images and are decoded
    decoder: str | None = None


class SearchConfig(BaseModel):
    """What to allocate from one sensitivity report: exact budgets (integer program), top-K splits, a Pareto
    front, and random schemes matching each budget scheme's INT4 share (the control a ranking must beat)."""

    formats: list[str] = Field(default_factory=lambda: ["W4A16", "W8A16"])
    allow_fp16: bool = True
    cost: str = "weight_bits"  # or bitops, or latency (then budgets are profiled ms of the latency table)
    latency_table: str | None = None  # `lowbit latency-table` JSON, for cost: latency
    budgets: list[float] = Field(default_factory=list)
    topk: list[int] = Field(default_factory=list)
    topk_low: str = "W4A16"
    topk_high: str = "W8A16"
    pareto_points: int = 0
    random_seeds: list[int] = Field(default_factory=list)
    # a deploy target (lowbit.targets): per layer, formats it would run in float there are not candidates
    target: TargetName | None = None


class SearchSpec(SearchConfig):
    method: str = "gradient"  # which sensitivity report drives the allocation
    budgets: list[float] = Field(default_factory=lambda: [5.0, 5.6, 6.0])
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    modelopt_budgets: list[float] = Field(default_factory=list)  # ModelOpt auto_quantize's own choice


class SensitivitySpec(BaseModel):
    """The study's sensitivity stage; model, size and device come from the study itself."""

    methods: list[str] = Field(default_factory=lambda: ["gradient"])
    formats: list[str] = Field(default_factory=lambda: ["W4A16", "W8A16"])
    batch: int = 8
    layers: list[str] | None = None
    # how many of the calibration images score the layers (the study's deterministic subset; default: all).
    # Apart because the two want different amounts: scoring costs a backward pass per image and format, while
    # GPTQ and fine-tuning gain from every calibration image there is (docs/results.md, fine-tuning)
    images: int | None = Field(None, ge=1)

    def scoring_data(self, calib: DataConfig) -> DataConfig:
        if self.images is None or (calib.max_images and calib.max_images <= self.images):
            return calib
        return calib.model_copy(update={"max_images": self.images})


class FinetuneSpec(BaseModel):
    """Fine-tune evaluated schemes by block-wise AdaRound on the calibration images; each result joins the table as
    `<scheme>+ft`."""

    schemes: list[str] = Field(default_factory=lambda: ["W4A16"])  # scheme names
    recipe: str = "mixed"  # lowbit.finetune.blockwise.RECIPES
    config: AdaRoundConfig | None = None  # overrides the recipe, whole
    # batch-order seeds, one fine-tune each (`<scheme>+ft-s<seed>`); default: the recipe's own seed (`<scheme>+ft`)
    seeds: list[int] | None = None

    def algorithm(self) -> AdaRoundConfig:
        return get_recipe(self.recipe, self.config)


class StudyConfig(WeightOptions):
    name: str = "study"
    model: str
    calib: DataConfig
    eval: DataConfig
    imgsz: int = Field(640, gt=0)
    device: str = "cpu"
    eval_batch: int = 8
    sensitivity: SensitivitySpec | None = None  # default: the search method on the search formats
    search: list[SearchSpec] = Field(default_factory=lambda: [SearchSpec()])  # one search per spec
    uniform: list[str] = Field(default_factory=lambda: ["W8A8", "W8A16", "W4A16"])
    schemes: list[str] = Field(default_factory=list)  # extra manifest files to evaluate
    max_drop_points: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    # weight_clip, rounding, weight_range (lowbit.quantize.manifest.WeightOptions): for every scheme
    # what the schemes are for (lowbit.targets): openvino-cpu, onnxruntime-cpu and tensorrt score every scheme the
    # target runs in low precision as its Q/DQ ONNX on the target's runtime, and openvino-cpu / onnxruntime-cpu
    # time them there; size scores PyTorch fake quantization and recommends the smallest scheme
    target: TargetName = DEFAULT_TARGET
    activation: ActivationCalibration = Field(default_factory=ActivationCalibration)  # ranges of exported graphs
    speed_threads: int | None = None  # runtime threads for timing (default: the runtime's own)
    speed_reps: int = Field(30, ge=1)  # interleaved rounds of batch-1 latency
    throughput_rounds: int = Field(8, ge=0)  # interleaved rounds of throughput (OpenVINO's THROUGHPUT hint); 0: none
    # what a timed target's decision minimises: batch-1 latency, or throughput (then throughput_rounds > 0)
    decide_by: Literal["latency", "throughput"] = "latency"
    save_checkpoints: bool = False
    finetune: FinetuneSpec | None = None
    # random halves of the evaluation images behind each scheme's standard error of its Δ vs FP32 (0: none)
    error_halves: int = Field(200, ge=0)

    @model_validator(mode="after")
    def _throughput_to_decide_by(self):
        if self.decide_by == "throughput" and not self.throughput_rounds:
            raise ValueError("decide_by: throughput needs throughput_rounds > 0")
        return self

    @field_validator("search", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, dict) else v

    @classmethod
    def load(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"{path}: study config not found")
        try:
            raw = yaml.safe_load(path.read_text())
            if not isinstance(raw, dict):
                raise LowbitError(f"{path}: a study config is a yaml mapping")
            # Paths in a config are relative to the config file, so a config travels with its data.
            resolve = lambda v: str((path.parent / v).resolve()) if (path.parent / v).exists() else v  # noqa: E731
            if isinstance(raw.get("model"), str):
                raw["model"] = resolve(raw["model"])
            for key in ("calib", "eval"):
                if isinstance(raw.get(key), dict) and isinstance(raw[key].get("path"), str):
                    raw[key]["path"] = resolve(raw[key]["path"])
            raw["schemes"] = [resolve(s) for s in raw.get("schemes", [])]
            for spec in [raw["search"]] if isinstance(raw.get("search"), dict) else raw.get("search") or []:
                if isinstance(spec, dict) and isinstance(spec.get("latency_table"), str):
                    spec["latency_table"] = resolve(spec["latency_table"])
            return cls.model_validate(raw)
        except yaml.YAMLError as e:
            raise LowbitError(f"{path}: malformed yaml ({e})") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise LowbitError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
