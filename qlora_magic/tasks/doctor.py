"""The doctor (`%qlora_doctor`, `qm.doctor()`): what in this environment would spoil a fine-tune, found in
seconds before any GPU time, each with its one-line fix. It reads versions, environment variables, device and
disk figures and the model's config; it loads no model, changes no setting and makes no network call.

The commonest failures it looks for: widgets that do not render (ipywidgets and the frontend's widget manager
out of step, Colab's custom widget manager, VS Code), "IProgress not found" from other libraries' progress bars,
a torch that sees no GPU, a bitsandbytes build that does not run on this device, a model that does not fit in
GPU memory, a merge with no room in RAM or on disk, a Hub that cannot be reached, a tracker that would stop at a
login prompt."""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from ..display.doctor_report import DoctorReport
from ..display.findings import Finding
from ..display.formatting import gb

# ipywidgets' major version -> the majors of the frontend packages that render it (JupyterLab, Notebook 7 / classic)
WIDGET_FRONTENDS = {7: {"jupyterlab_widgets": 1, "widgetsnbextension": 3}, 8: {"jupyterlab_widgets": 3, "widgetsnbextension": 4}}
VSCODE_VARS = ("VSCODE_PID", "VSCODE_CWD", "VSCODE_IPC_HOOK_CLI")
BYTES_PER_WEIGHT = {4: 0.56, 8: 1.06, 16: 2.0}  # NF4 + double-quantized absmax; int8 + row scales; bf16
TRAINING_MARGIN = 1.3  # LoRA weights, optimizer, activations of short examples, CUDA context: beyond the weights


def package_version(name: str) -> str | None:
    """The installed version of `name`, read from its metadata (nothing is imported); None when absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _major(version: str | None) -> int | None:
    try:
        return int(version.split(".")[0]) if version else None
    except ValueError:
        return None


def frontend() -> str:
    """Where this runs: colab, vscode, kaggle, jupyter (a kernel), ipython (a terminal) or python (a script)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    kernel = shell is not None and getattr(shell, "kernel", None) is not None
    if "google.colab" in sys.modules:
        return "colab"
    if any(os.environ.get(name) for name in VSCODE_VARS):
        return "vscode"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    if kernel:
        return "jupyter"
    return "ipython" if shell is not None else "python"


FRONTEND_NAMES = {"colab": "Google Colab", "vscode": "VS Code", "kaggle": "Kaggle", "jupyter": "a Jupyter kernel",
                  "ipython": "an IPython terminal", "python": "plain Python (a script)"}


def diagnose(session, model=None, bits=None) -> DoctorReport:
    """Every check, in the order a fine-tune meets them. `model`: a Hub id or folder to size (default: the
    loaded model, else the embedded default); `bits`: 4 or 8 (default: both, or the loaded model's)."""
    where = frontend()
    findings = [*widget_findings(where), display_finding(where)]
    torch_finding, device = torch_check()
    findings += [torch_finding, bitsandbytes_check(device)]
    weights = model_weights(session, model)
    findings += [memory_check(session, device, weights, bits)]
    findings += [found for found in [gpus_check(device, weights)] if found is not None]
    findings += [merge_room_check(weights), hub_check(), tracker_check()]
    return DoctorReport(findings)


# --- frontend and widgets -----------------------------------------------------------------------------------

def widget_findings(where: str) -> list[Finding]:
    found = [Finding("ok", "frontend", FRONTEND_NAMES[where])]
    widgets = package_version("ipywidgets")
    if widgets is None:
        if where in ("python", "ipython"):
            return found + [Finding("ok", "ipywidgets", "not installed (not needed outside a notebook)")]
        return found + [Finding("warning", "ipywidgets", "not installed: the panel and --display widget cannot show, and other "
                                "libraries' progress bars print 'IProgress not found'", "pip install ipywidgets, then restart the kernel")]
    major = _major(widgets)
    if where == "colab":
        fix = "" if major == 7 else "the panel switches it on; for other widgets: from google.colab import output; output.enable_custom_widget_manager()"
        found.append(Finding("ok", "ipywidgets", f"{widgets}; Colab renders ipywidgets 8 through its custom widget manager", fix))
        return found
    if where == "vscode":
        found.append(Finding("ok", "ipywidgets", f"{widgets}; VS Code renders widgets with its Jupyter extension's own manager",
                             "if widgets show blank, update the Jupyter extension and reload the window"))
        return found
    wanted = WIDGET_FRONTENDS.get(major)
    if wanted is None:
        found.append(Finding("warning", "ipywidgets", f"{widgets}: a version this check does not know", "pip install 'ipywidgets>=8.1'"))
        return found
    installed = {pkg: package_version(pkg) for pkg in wanted}
    wrong = [f"{pkg} {v}" for pkg, v in installed.items() if v is not None and _major(v) != wanted[pkg]]
    missing = [pkg for pkg, v in installed.items() if v is None]
    pins = " ".join(f"'{pkg}=={wanted[pkg]}.*'" for pkg in wanted)
    if wrong:
        found.append(Finding("problem", "ipywidgets", f"{widgets} with {', '.join(wrong)}: the frontend's widget manager is for another "
                             "major version, so widgets show as text or 'Error displaying widget'",
                             f"pip install 'ipywidgets=={major}.*' {pins} and restart JupyterLab"))
    elif missing and where == "jupyter":
        found.append(Finding("warning", "ipywidgets", f"{widgets}, but {' and '.join(missing)} is not in this kernel's environment "
                             "(fine if JupyterLab runs from another one that has it)",
                             f"if widgets show as text: pip install {pins} where JupyterLab runs"))
    else:
        shown = ", ".join(f"{pkg} {v}" for pkg, v in installed.items() if v)
        found.append(Finding("ok", "ipywidgets", f"{widgets}" + (f" with {shown}" if shown else "")))
    return found


def display_finding(where: str) -> Finding:
    """Which form %%qlora_train's live display takes here (--display auto), and whether widgets are a choice."""
    from ..display import in_notebook

    if not in_notebook():
        return Finding("ok", "live display", "text: a progress bar and a line per log (no notebook kernel here)")
    shown = "HTML refreshed in place (kept in the saved notebook; also in VS Code and Colab)"
    if package_version("ipywidgets") is None:
        return Finding("ok", "live display", f"{shown}; widgets (the panel, --display widget) need ipywidgets")
    return Finding("ok", "live display", f"{shown}; --display widget for widgets")


# --- torch, CUDA, bitsandbytes ------------------------------------------------------------------------------

def driver_version() -> str | None:
    """The NVIDIA driver's version, from the kernel module (no nvidia-smi call); None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    return next((w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()), None)


def torch_check() -> tuple[Finding, str]:
    """The torch row, and the device training would use (cuda or cpu)."""
    import torch

    built = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        driver = driver_version()
        return Finding("ok", "torch", f"{torch.__version__}, CUDA {built}, {props.name}" + (f" x{count}" if count > 1 else "")
                       + (f", driver {driver}" if driver else "")), "cuda"
    if built:
        driver = driver_version()
        why = f"the driver ({driver}) may be older than CUDA {built} needs" if driver else "no NVIDIA driver is loaded"
        return Finding("problem", "torch", f"{torch.__version__} is built for CUDA {built} but sees no GPU: {why}",
                       "check nvidia-smi; on Colab: Runtime > Change runtime type > a GPU; or install a torch build for your driver"), "cpu"
    return Finding("warning", "torch", f"{torch.__version__} (CPU build): no GPU, so training runs on the CPU (fine for the 135M default, slow beyond)",
                   "on a GPU machine install a CUDA build of torch; on Colab: Runtime > Change runtime type > a GPU"), "cpu"


def bitsandbytes_check(device: str) -> Finding:
    """Whether bitsandbytes quantizes on `device`: one small NF4 quantization there (a wrong build fails here,
    not minutes into a load)."""
    version = package_version("bitsandbytes")
    if version is None:
        return Finding("problem", "bitsandbytes", "not installed: no 4- or 8-bit loading", "pip install -U bitsandbytes")
    from ..engine.quiet import quiet_bnb_warnings

    quiet_bnb_warnings()  # before bitsandbytes is imported: its CPU backend's notice of an optional Hub kernel
    try:
        import torch
        from bitsandbytes import functional

        functional.quantize_4bit(torch.ones(64, 64, device=device, dtype=torch.float32), quant_type="nf4")
    except Exception as error:  # a build for another CUDA or torch, a missing native library
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        import torch

        return Finding("problem", "bitsandbytes", f"{version} fails on {device}: {first}",
                       f"pip install -U bitsandbytes (for torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}) and restart the kernel")
    return Finding("ok", "bitsandbytes", f"{version}: 4-bit quantization runs on {device}")


# --- memory, RAM and disk -----------------------------------------------------------------------------------

def model_weights(session, model=None) -> dict | None:
    """{'name', 'linear' (parameters of the quantized layers), 'other' (embeddings, head, norms: kept 16-bit)}
    of the named model, else the loaded one, else the embedded default; read from config.json, from a local
    folder or the local cache only (no download). None when its config is not here."""
    from ..engine.speed import model_dims

    if model is None and session.model is not None:
        config = session.model.config
        name = getattr(session.load_config, "model", None) or "the embedded SmolLM2-135M-Instruct"
    else:
        config, name = _local_config(model)
        if config is None:
            return {"name": name, "missing": True}
    dims = model_dims(type("Model", (), {"config": config})())
    hidden, layers, vocab, inter = dims["hidden"], dims["layers"], dims["vocab"], dims["intermediate"]
    if not (hidden and layers):
        return {"name": name, "missing": True}
    heads = getattr(config, "num_attention_heads", None) or 1
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
    linear = layers * (attention + 3 * hidden * inter * experts)
    tied = getattr(config, "tie_word_embeddings", False)
    loaded = model is None and session.model is not None
    return {"name": name, "linear": linear, "other": vocab * hidden * (1 if tied else 2), "loaded": loaded}


def _local_config(model):
    from transformers import AutoConfig

    from ..engine.offline import cached_model_folder

    if model is None or model == "default":
        from ..engine.default_model import DEFAULT_MODEL_NAME, cache_dir

        # its converted folder, when the first load made it (the doctor converts nothing)
        folder, name = cache_dir() / DEFAULT_MODEL_NAME, "the embedded SmolLM2-135M-Instruct"
    else:
        path = Path(str(model)).expanduser()
        folder, name = (path if path.is_dir() else cached_model_folder(str(model))), str(model)
    if folder is None or not (Path(folder) / "config.json").exists():
        return None, name
    return AutoConfig.from_pretrained(str(folder)), name


def weights_bytes(weights: dict, bits: int) -> int:
    return int(weights["linear"] * BYTES_PER_WEIGHT[bits] + weights["other"] * BYTES_PER_WEIGHT[16])


def memory_check(session, device: str, weights, bits=None) -> Finding:
    """Free memory (GPU, or RAM on the CPU) against what the model needs to train in 4 and 8 bits."""
    import psutil

    if weights is None or weights.get("missing"):
        name = (weights or {}).get("name", "the model")
        return Finding("warning", "memory", f"{name} has no config.json here (not in the local cache), so its size is unknown offline",
                       "load it once online, or name a local folder")
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        where = f"GPU memory: {gb(free)} free of {gb(total)}"
    else:
        free = psutil.virtual_memory().available
        where = f"RAM (the CPU trains in it): {gb(free)} free"
    if weights["loaded"]:  # its memory is taken already: what is left is for training
        return Finding("ok", "memory", f"{weights['name']} is loaded ({session.load_config.bits}-bit); {where}")
    sizes = (bits,) if bits in (4, 8) else (4, 8)
    needs = {b: int(weights_bytes(weights, b) * TRAINING_MARGIN) for b in sizes}
    need_text = ", ".join(f"{b}-bit about {gb(n)}" for b, n in needs.items())
    head = weights["name"]
    fits = [b for b, n in needs.items() if n <= free]
    if len(fits) == len(needs):
        return Finding("ok", "memory", f"{head} needs {need_text} to train; {where}")
    if fits:
        return Finding("warning", "memory", f"{head} needs {need_text} to train; {where}", f"load it with --bits {min(fits)}")
    fix = "free memory (%qlora_unload, restart other kernels), use a larger GPU, or a smaller model"
    if device == "cuda" and torch.cuda.device_count() > 1:  # the sizes are one GPU's; together they may hold it
        fix = f"spread it over the {torch.cuda.device_count()} GPUs (the several GPUs row), or {fix}"
    return Finding("problem", "memory", f"{head} needs {need_text} to train; {where}", fix)


def gpus_check(device: str, weights) -> Finding | None:
    """With several GPUs: whether `%%qlora_train --gpus N` can use them (NCCL, which torch.distributed needs
    between GPUs), and the way to train a model whose 4-bit weights no single GPU holds. None with one GPU."""
    import torch

    count = torch.cuda.device_count() if device == "cuda" else 0
    if count < 2:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_nccl_available()):
        return Finding("warning", "several GPUs", f"{count} GPUs, but this torch build has no NCCL, which --gpus needs between them",
                       "train on Linux (WSL on Windows) with a CUDA build of torch; one GPU still works")
    smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
    version = torch.cuda.nccl.version()  # (2, 27, 7) in torch 2.x
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    found = f"{count} GPUs (NCCL {version}): %%qlora_train --gpus {count} trains on all of them"
    if weights and not weights.get("missing") and weights_bytes(weights, 4) * TRAINING_MARGIN > smallest:
        return Finding("ok", "several GPUs", f"{found}; {weights['name']} in 4-bit does not fit one of them ({gb(smallest)}), "
                       "so load it spread (%qlora_load MODEL --bits 4 --device-map auto) and train with --gpus: fsdp shards it")
    return Finding("ok", "several GPUs", found)


def merge_room_check(weights) -> Finding:
    """%qlora_merge builds a 16-bit copy in RAM and writes it to disk: room for both."""
    import psutil

    disk = shutil.disk_usage(Path.cwd())
    ram = psutil.virtual_memory().available
    where = f"RAM {gb(ram)} free, disk {gb(disk.free)} free here"
    if weights is None or weights.get("missing"):
        return Finding("ok", "merge and export", where)
    need = weights_bytes(weights, 16)
    short = [what for what, free in (("RAM", ram), ("disk", disk.free)) if free < need]
    if short:
        return Finding("warning", "merge and export", f"a 16-bit merge of {weights['name']} needs about {gb(need)}; {where}",
                       f"free {' and '.join(short)} before %qlora_merge, or merge on a larger machine (the saved adapter is enough)")
    return Finding("ok", "merge and export", f"a 16-bit merge needs about {gb(need)}; {where}")


# --- Hub and trackers ---------------------------------------------------------------------------------------

def hub_check() -> Finding:
    """Whether models come from the Hub or only from the cache, from the settings alone (no request)."""
    from huggingface_hub import constants, get_token

    from ..engine import offline

    cache = constants.HF_HUB_CACHE
    try:
        room = f", {gb(shutil.disk_usage(_existing(Path(cache))).free)} free"
    except OSError:
        room = ""
    token = "a Hub token is set" if get_token() else "no Hub token (gated models such as Llama need one: hf auth login)"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return Finding("ok", "Hub", f"offline (HF_HUB_OFFLINE): models and data load only from the cache {cache}{room}; {token}",
                       "unset HF_HUB_OFFLINE to download a model not cached yet")
    if offline.always_online():
        mode = f"online ({offline.ONLINE_ENV}=1: no probe)"
    elif offline._hub_answered is None:
        mode = "online unless huggingface.co does not answer a 1.5 s probe at the first download"
    else:
        mode = "online (the Hub answered)" if offline._hub_answered else "offline (the Hub did not answer): only cached models load"
    return Finding("ok", "Hub", f"{mode}; cache {cache}{room}; {token}")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tracker_check() -> Finding:
    """qlora_magic logs to TensorBoard in the run folder (--report-to adds others); a wandb set up in this process
    outside qlora_magic would ask for a login (--report-to wandb logs offline instead)."""
    version = package_version("wandb")
    if version is None:
        return Finding("ok", "trackers", "TensorBoard in each run folder; wandb is not installed, so nothing asks for a login")
    mode = os.environ.get("WANDB_MODE", "").lower()
    logged_in = os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")
    if mode in ("offline", "disabled", "dryrun") or logged_in:
        return Finding("ok", "trackers", f"TensorBoard in each run folder; wandb {version} " + (f"mode {mode}" if mode else "logged in"))
    return Finding("warning", "trackers", f"wandb {version} is installed with no login: a wandb run started here would stop at a login prompt "
                   "(--report-to wandb logs offline instead)",
                   "wandb login (or set WANDB_API_KEY), or WANDB_MODE=offline")


def _netrc_has(host: str) -> bool:
    try:
        import netrc

        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
