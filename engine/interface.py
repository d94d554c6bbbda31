"""The engine's torch-free interface: everything the MCP server uses of the engine, in one place.

The server imports this module and nothing else of the engine (a test checks it), so what crosses
between the two processes is declared here: the job specifications and result, the typed events,
the job runner, the preflight, process identity and the state folder. Importing it loads no
torch, transformers or other heavy library (also checked by a test): the preflight's data,
model-catalogue and memory modules are torch-free too.
"""

from engine.contract import events
from engine.contract.events import read_events
from engine.contract.files import (
    PathError,
    backprop_home,
    looks_like_path,
    missing_message,
    path_kind,
    quoted,
    user_path,
)
from engine.contract.grpo import RewardChoice
from engine.contract.settings import setting_parameters, settings_of, training_spec
from engine.contract.spec import (
    EVENTS_FILE,
    WORKER_LOG,
    DatasetSettings,
    ExportSpec,
    FinetuneSpec,
    JobResult,
    JobState,
    LoraSettings,
    SeriesSpec,
    TrainSettings,
    read_result,
    read_spec,
    running_artifacts,
)
from engine.hardware.installed import MissingExtra, require_for_spec
from engine.hardware.installed import require as require_extra
from engine.jobs import processes as procs
from engine.jobs.runner import create_job, engine_command, request_cancel, start_worker, worker_env
from engine.jobs.warm_worker import WarmPool
from engine.planning.gpu_report import GpuReport, gpu_report
from engine.planning.preflight import DataCheck, PreflightError, TokenStats, check_model, preflight, problems
