"""The only module that reads ``os.environ``. Each setting is a function so tests can change it."""

import os


def log_level() -> str:
    """FLOTILLA_LOG_LEVEL: logging level name (default INFO)."""
    return os.environ.get("FLOTILLA_LOG_LEVEL", "INFO").upper()


# The variables external launchers set for each process they start (flotilla.distributed.launch reads them).
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",  # torchrun (MASTER_*: any launcher)
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI's mpirun
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_NODELIST",  # Slurm's srun
    "SLURM_JOB_NODELIST",
)


def launcher_environment() -> dict[str, str]:
    """The ``LAUNCHER_VARIABLES`` that are set: torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT, Open MPI's OMPI_COMM_WORLD_*, Slurm's SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and node lists.
    They say whether this process was started by a launcher and where rank 0 listens
    (``flotilla.distributed.launch.detect_launch``); default: none set (no launcher)."""
    return {name: os.environ[name] for name in LAUNCHER_VARIABLES if name in os.environ}


def named(variable: str) -> str | None:
    """The value of an environment variable the user named in a setting (e.g. a deployment file's
    ``api_key_env``); None when unset."""
    return os.environ.get(variable)


def cpu_kernels_enabled() -> bool:
    """FLOTILLA_CPU_KERNELS: 0/false/no/off runs eager PyTorch ops instead of the fused CPU kernels (default on)."""
    return os.environ.get("FLOTILLA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> str:
    """FLOTILLA_CACHE_DIR: where flotilla caches compiled kernels and model files assembled from several
    packages (default ~/.cache/flotilla)."""
    return os.environ.get("FLOTILLA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flotilla")


def kernel_build_timeout() -> float:
    """FLOTILLA_KERNEL_BUILD_TIMEOUT: the most seconds a start spends on the CPU kernels (waiting for another
    process's build, then compiling) before it runs eager PyTorch ops instead (default 180)."""
    value = os.environ.get("FLOTILLA_KERNEL_BUILD_TIMEOUT")
    return float(value) if value else 180.0


def kernel_march() -> str:
    """FLOTILLA_KERNEL_MARCH: the ``-march`` of the CPU kernel build. ``auto`` (default): a portable baseline
    (x86-64-v3 where the CPU has it, else the compiler's default), faster paths chosen at run time; ``native``
    or any other value: passed to the compiler as is (the build then runs only on CPUs like this one)."""
    return os.environ.get("FLOTILLA_KERNEL_MARCH", "").strip() or "auto"


def cxx_compiler() -> str:
    """CXX: the C++ compiler that builds the CPU kernels (default ``c++``); may carry arguments."""
    return os.environ.get("CXX", "").strip() or "c++"


def attention_backend() -> str:
    """FLOTILLA_ATTENTION_BACKEND: auto (default: Triton on CUDA when installed, else PyTorch), torch or triton
    (vLLM's VLLM_ATTENTION_BACKEND; flotilla.layers.attention.selector). Lower-cased; empty means auto."""
    return os.environ.get("FLOTILLA_ATTENTION_BACKEND", "auto").strip().lower() or "auto"


def triton_interpreted() -> bool:
    """TRITON_INTERPRET (Triton's own): set and not 0, Triton kernels run in its interpreter on the CPU (the
    tests without a GPU); default unset."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
