"""An emulator of the Kubernetes API server's TokenRequest API (HTTPS, in-process or not).

See emulator.py for the Emulator, seed.py for the seed schema and faults.py for failure
injection; `python -m broker.emulator` runs one as a process.
"""

from broker.apiserver.wire import encode_envelope
from broker.emulator.auth import UserInfo
from broker.emulator.config import EmulatorConfig
from broker.emulator.emulator import Emulator
from broker.emulator.faults import Faults
from broker.emulator.pki import ServingPKI, generate_pki
from broker.emulator.records import RecordedRequest
from broker.emulator.runner import run_emulator_forever
from broker.emulator.seed import Seed, SeedError, load_seed
from broker.emulator.store import ObjectExists, ObjectNotFound, ObjectStore

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "Faults",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectStore",
    "RecordedRequest",
    "Seed",
    "SeedError",
    "ServingPKI",
    "UserInfo",
    "encode_envelope",
    "generate_pki",
    "load_seed",
    "run_emulator_forever",
]
