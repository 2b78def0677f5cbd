"""Everything that reaches the disk as a model or a resumable state, and the one way files and
folders are written: atomically.

    atomic_file(path, mode)          a file that appears whole or not at all
    atomic_folder(path)              the same for a folder (a Hugging Face export, say)
    save_ckpt / load_ckpt            torch.distributed.checkpoint of a sharded training state

Hugging Face folders (reading, writing, exporting a sharded model) are hf_folder.py's.

A crash (or SIGKILL) at any instant leaves either the old content or the new one, never a
file or folder that looks complete but is not: everything is written under a hidden sibling
name and renamed into place, and a rename is atomic on POSIX filesystems.
"""
import contextlib
import errno
import json
import os
import pickle
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import parallel
from errors import Diverged, InputError, MissingInput, UserError, write_error, writing


# ----------------------------------------------------------------------------------------------
# Atomic writes

def _tmp_sibling(path):
    """A unique hidden name beside path. Files and folders are created there with open() and
    os.mkdir, so they get the umask's mode (mkstemp's and mkdtemp's would be owner-only, and
    the rename would keep that)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """open(path, mode) for writing, except that the file appears at `path` only when the block
    ends without an exception. A write the system refuses (disk full, permission) is a DiskError
    naming `path`."""
    path = os.fspath(path)
    tmp = _tmp_sibling(path)
    try:
        with writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmp, mode) as f:
                yield f
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj, **kw):
    with atomic_file(path) as f:
        json.dump(obj, f, **kw)


def publish_folder(tmp, path):
    """Move the finished folder `tmp` to `path`, replacing a folder already there: the old one is
    first moved aside, so `path` always names a complete folder or nothing."""
    if os.path.exists(path):
        old = _tmp_sibling(path)
        os.mkdir(old)
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_folder(path):
    """Yields an empty temporary folder beside `path`; when the block ends without an exception
    it becomes `path` (publish_folder), otherwise it is deleted. A write the system refuses
    (disk full, permission) is a DiskError naming `path`."""
    path = os.fspath(path)
    tmp = _tmp_sibling(path)
    try:
        with writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.mkdir(tmp)
            yield tmp
            publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask():
    """The process umask. Linux shows it in /proc; elsewhere set-and-restore, which for an
    instant applies 022 to files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# Resumable training state: torch.distributed.checkpoint into a temporary folder that rank 0
# renames once every rank has written, so a folder named step-N is always complete.

def last_checkpoint(stage_dir):
    """The newest complete checkpoint folder of a stage, or None."""
    ckpt = os.path.join(stage_dir, "ckpt")
    steps = sorted(int(d[5:]) for d in os.listdir(ckpt) if d.startswith("step-")) if os.path.isdir(ckpt) else []
    return os.path.join(ckpt, f"step-{steps[-1]}") if steps else None


def _non_finite(state, prefix=""):
    """The name of the first floating tensor of a (nested) state dict holding a NaN or an inf
    in this rank's shard, or None."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            local = v.to_local() if hasattr(v, "to_local") else v
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                return name
        elif (bad := _non_finite(v, name + ".")) is not None:
            return bad
    return None


# A checkpoint holds what trains and the optimiser state. Frozen parameters (a LoRA run's base)
# are left out: they are the stage's starting folder, which build_model loads again on resume.
# strict=False when loading skips exactly those: every key asked for came from get_state_dict
# with the same options, and dcp.load fails on any it does not find in the checkpoint.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def check_finite(state, stage_dir, when, consequence):
    """Every rank checks its shards of `state` (weights, optimiser state) for NaN and inf, and all
    learn whether any rank found one: Diverged on that rank, PeerFailed on the others."""
    bad = _non_finite(state)
    if bad is not None:
        parallel.reduce_sums({"bad": 1.0})
        raise Diverged(f"{stage_dir}: {when}: '{bad}' holds NaN or inf after the update, so {consequence}. "
                       + resume_hint(stage_dir, last_checkpoint(stage_dir)))
    if parallel.reduce_sums({"bad": 0.0})["bad"]:
        raise parallel.PeerFailed("another rank found NaN or inf in its shards")


def _state_bytes(state):
    """The bytes of this rank's shards of a (nested) state dict: what dcp.save writes for it."""
    items = state.values() if isinstance(state, dict) else state if isinstance(state, list) else ()
    total = 0
    for v in items:
        if isinstance(v, torch.Tensor):
            local = v.to_local() if hasattr(v, "to_local") else v
            total += local.numel() * local.element_size()
        else:
            total += _state_bytes(v)
    return total


def check_space(folder, need, what):
    """The DiskError for a write of about `need` bytes into `folder` that its filesystem has no
    room for, or None: said before the write, not as a C++ error in the middle of it."""
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free >= need:
        return None
    e = write_error(errno.ENOSPC, folder)
    e.args = (f"no space left on device: {folder}: {what} needs {need / 2**20:.1f} MiB, "
              f"{free / 2**20:.1f} MiB are free; free some space, then run the same command with --resume",)
    return e


def save_ckpt(stage_dir, step, model, opt, sched):
    """Every rank writes its shards into ckpt/.tmp-step-N; rank 0 adds meta.json and renames it
    step-N. A write that fails (a full disk, say) deletes the partial folder and is a DiskError."""
    ckpt = os.path.join(stage_dir, "ckpt")
    tmp, final = os.path.join(ckpt, f".tmp-step-{step}"), os.path.join(ckpt, f"step-{step}")
    model_sd, opt_sd = get_state_dict(model, opt, options=TRAINED_ONLY)
    # Never a checkpoint a resume would only repeat a divergence from.
    check_finite({"model": model_sd, "optim": opt_sd}, stage_dir, f"step {step}", "this checkpoint was not saved")
    # Every rank writes about as much as this one, plus 64 KiB of metadata (meta.json, .metadata
    # and the tensors' headers: ~40 KiB for the demo); each rank checks the whole against the
    # folder's free space, as the ranks of one machine share it.
    need = _state_bytes({"model": model_sd, "optim": opt_sd}) * parallel.world() + 2**16
    try:
        with writing(ckpt):
            short = check_space(ckpt, need, f"the checkpoint of step {step}")
            # Every rank learns whether any is short of space (ranks on other machines may write
            # other disks), so none is left waiting in dcp.save for one that stopped.
            if parallel.reduce_sums({"short": float(short is not None)})["short"]:
                raise short or parallel.PeerFailed("another rank has no space for its checkpoint shards")
            dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=tmp)
            parallel.barrier()
            if parallel.rank() == 0:
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump({"step": step, "scheduler": sched.state_dict(),
                               "rng_cpu": torch.get_rng_state().tolist()}, f)
                publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written folder a later run might read
        raise
    if parallel.rank() == 0:
        done = sorted(int(d[5:]) for d in os.listdir(ckpt) if d.startswith("step-"))
        for old in done[:-2]:  # keep the newest two
            shutil.rmtree(os.path.join(ckpt, f"step-{old}"), ignore_errors=True)
    parallel.barrier()


def resume_hint(stage_dir, last):
    """What a diverged stage leaves behind, and how to continue."""
    if last is None:
        return (f"{stage_dir} has no checkpoint yet: --resume restarts this stage from its start "
                "(with a smaller learning rate, or it will diverge again)")
    return (f"The last good checkpoint is {last}: continue from it with --resume and a smaller "
            "learning rate (--lr, or --sft-lr for the warm start), a larger --beta or a smaller --clip")


def load_ckpt(stage_dir, model, opt, sched):
    """Restore the newest complete checkpoint of a stage; returns its step (0 when none). The
    learning rate is this run's (sched as built now): a resume may change it."""
    path = last_checkpoint(stage_dir)
    if path is None:
        return 0
    model_sd, opt_sd = get_state_dict(model, opt, options=TRAINED_ONLY)
    state = {"model": model_sd, "optim": opt_sd}
    reader = _CheckedReader(path, read_dcp_metadata(path))
    try:
        dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner())
    except CheckpointException as e:  # dcp gathers every rank's failure into one BaseException
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UserError)]
        if refused:
            raise refused[0] from None
        raise
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=TRAINED_ONLY)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    base = list(sched.base_lrs)  # this run's --lr; the saved state would bring back the old one
    sched.load_state_dict(meta["scheduler"])
    sched.base_lrs = base
    for group, lr, factor in zip(opt.param_groups, base, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
    torch.set_rng_state(torch.tensor(meta["rng_cpu"], dtype=torch.uint8))
    parallel.log(f"  resumed from {path}")
    return meta["step"]


# Resuming must never run code found in the run folder. torch.distributed.checkpoint reads its
# `.metadata` with pickle.load and the non-tensor entries (optimiser hyper-parameters) with
# torch.load(weights_only=False); both would execute whatever a planted file asks for. Here
# the metadata goes through an unpickler that knows only the classes DCP metadata is made of
# (what pickletools shows in a real `.metadata`), and the entries through weights_only=True.

_DCP_METADATA_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def read_dcp_metadata(path):
    """A checkpoint's `.metadata`, refused (InputError) when it names anything a DCP metadata
    file does not hold."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise MissingInput(f"{file}: missing, so {path} is not a complete checkpoint; delete the folder to "
                           "resume from the one before it") from None
    except pickle.UnpicklingError as e:
        raise InputError(f"{file}: refused, {e}: not a checkpoint train.py wrote, and nothing in it was run; "
                         f"delete {path} to resume from the checkpoint before it") from None
    except Exception as e:  # truncated, or not a pickle at all
        raise InputError(f"{file}: unreadable ({type(e).__name__}: {e}); delete {path} to resume from the "
                         "checkpoint before it") from None


class _CheckedReader(FileSystemReader):
    """FileSystemReader that returns metadata already read by read_dcp_metadata."""

    def __init__(self, path, metadata):
        super().__init__(path)
        self.checked_metadata = metadata

    def read_metadata(self, *args, **kwargs):
        md = self.checked_metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries go through torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value):
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"checkpoint entry '{fqn}': refused, it is not plain data ({first}); nothing in it "
                             "was run. Delete the checkpoint folder to resume from the one before it") from None
        if not self.flatten_state_dict:
            self.state_dict[fqn] = obj
            return
        node, path = self.original_state_dict, self.mappings[fqn]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = obj
