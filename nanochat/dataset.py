"""Pretraining shards: list, check and read them; download them (online) or build them from text
on this machine (offline, the text chosen by nanochat.local_corpus).

    python -m nanochat.dataset -n 8                      # FineWeb-Edu shards 0..7 + the val shard
    python -m nanochat.dataset -n 8 --dataset=climbmix   # NVIDIA ClimbMix (upstream's 2026 choice)
    python -m nanochat.dataset --source=local            # offline corpus from this machine's text
    python -m nanochat.dataset                           # auto: online if reachable, else local

Online datasets (--dataset), both re-shuffled into parquet shards on the hub by karpathy:
  fineweb_edu  karpathy/fineweb-edu-100b-shuffle  shards 0..1822, shard_01822 is val
  climbmix     karpathy/climbmix-400b-shuffle     shards 0..6542, shard_06542 is val
Both have the same schema (one string column `text`, one document per row), so everything after
the download is the same code. Switching dataset in one base_data needs --force (no mixed corpora);
retrain the tokenizer after switching.

Layout: `$NANOCHAT_BASE_DIR/base_data/shard_{index:05d}.parquet`, one string column `text`, one
document per row. The LAST shard (highest index) is the validation split, all others are train:
online that is the dataset's last shard (downloaded along with shards 0..N-1), offline the local
corpus puts its held-out documents in its last shard too.

Integrity: `manifest.json` records each shard's size and sha256 (online: the hub's LFS sha256
from its listing API when the base URL is a hub repo, else the digest of the downloaded file;
offline: at build). `verify_shards`, called when a loader starts, compares every shard's size and
sha256 with the manifest (digests cached per file size+mtime+inode in `.verified.json`) and reads
its footer, so a truncated or bit-flipped shard never reaches step 1: a downloaded one is fetched
again, a local one is named in one line with the command that rebuilds it. The online command
checks the shards already there the same way. Shards carry parquet page checksums (CRC32),
verified on every read.

Our own urllib code, not huggingface_hub: the shards and the eval bundle also come from non-hub
URLs (mirrors, S3), and what the hub part needs (tree listing, resolve URLs, the HF_* variables,
Range resume, a lock) is ~150 lines in nanochat/download.py, tested against a local server.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, print0, run_main
from nanochat.config import Flags, UserError, check, parse_args
from nanochat.download import (
    DownloadError,
    download_file,
    file_lock,
    hf_endpoint,
    hf_offline,
    hub_headers,
    hub_tree,
    reachable,
    sha256_file,
    temp_path,
)
from nanochat.local_corpus import LOCAL_SEED, MIN_VAL_DOCS, local_shards

@dataclass(frozen=True)
class OnlineDataset:
    repo: str  # hub dataset repo holding shard_XXXXX.parquet at its top level
    val_index: int  # the last shard, the validation split


ONLINE_DATASETS = {
    "fineweb_edu": OnlineDataset("karpathy/fineweb-edu-100b-shuffle", 1822),
    "climbmix": OnlineDataset("karpathy/climbmix-400b-shuffle", 6542),
}
DEFAULT_DATASET = "fineweb_edu"
FINEWEB_REPO = ONLINE_DATASETS["fineweb_edu"].repo
MAX_SHARD_INDEX = ONLINE_DATASETS["fineweb_edu"].val_index
SHARD_GLOB = "shard_*.parquet"
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # {file: [size, mtime_ns, inode, sha256]}: digests already computed here
RACY_S = 2.0
NO_SHARDS_HINT = "run `python -m nanochat.dataset --source=local` (offline) or `python -m nanochat.dataset -n 8`"
ROW_GROUP_DOCS = 1024
HUB_RESOLVE_URL = re.compile(r"^(?P<endpoint>https?://.+?)/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/?$")


class CorruptShardError(UserError, ValueError):
    """A shard that cannot be read or does not match the manifest; the message names the file and
    the command that fixes it."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    return get_base_dir() / "base_data"


def default_base_url(dataset: str = DEFAULT_DATASET) -> str:
    """$NANOCHAT_DATA_URL, else the dataset's repo on the hub at hf_endpoint() ($HF_ENDPOINT)."""
    return os.environ.get("NANOCHAT_DATA_URL") or f"{hf_endpoint()}/datasets/{ONLINE_DATASETS[dataset].repo}/resolve/main"


# ---------------------------------------------------------------------------------------------
# writing shards and the manifest

def write_shard(texts: list[str], path: Path, row_group_docs: int = ROW_GROUP_DOCS) -> None:
    """A parquet shard with one string column `text` and page checksums, written atomically."""
    tmp = temp_path(path)
    try:
        table = pa.table({"text": pa.array(texts, type=pa.string())})
        pq.write_table(table, tmp, row_group_size=row_group_docs, compression="zstd", write_page_checksum=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(data_dir: Path) -> dict | None:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptShardError(f"{path} is not valid JSON ({e}); delete it and re-run `python -m nanochat.dataset`") from None


def _write_json(path: Path, value: dict) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def record_shards(data_dir: Path, entries: list[dict], **header) -> None:
    """Add or replace shard `entries` ({"file", "bytes", "sha256", ...}) in the manifest, setting
    its top-level `header` keys; safe against concurrent writers (a file lock)."""
    with file_lock(data_dir / f"{MANIFEST}.lock"):
        manifest = read_manifest(data_dir) or {}
        manifest.update(header)
        by_file = {entry["file"]: entry for entry in manifest.get("shards", [])}
        by_file.update({entry["file"]: entry for entry in entries})
        manifest["shards"] = [by_file[name] for name in sorted(by_file)]
        _write_json(data_dir / MANIFEST, manifest)


def clear_shards(data_dir: Path) -> None:
    """Remove the manifest first (an incomplete corpus must not look complete), then the shards."""
    (data_dir / MANIFEST).unlink(missing_ok=True)
    (data_dir / VERIFIED).unlink(missing_ok=True)
    for path in data_dir.glob(SHARD_GLOB):
        path.unlink()


# ---------------------------------------------------------------------------------------------
# checking shards

def rebuild_hint(manifest: dict | None) -> str:
    """The command that replaces a bad shard, for the error message."""
    if manifest is not None and manifest.get("source") == "local":
        return "rebuild the corpus: python -m nanochat.dataset --source=local --force"
    if manifest is not None and manifest.get("source") == "online":
        train = len(manifest.get("shards", [])) - 1
        dataset = manifest.get("dataset", DEFAULT_DATASET)
        return f"re-fetch it: python -m nanochat.dataset --source=online -n {max(train, 0)} --dataset={dataset}"
    return "delete it and re-run `python -m nanochat.dataset`"


def cached_sha256(path: Path) -> str:
    """sha256 of `path`, reusing the digest in its folder's .verified.json while its size, mtime
    and inode are unchanged. A file modified in the last RACY_S seconds is not cached: a rewrite
    within the same mtime tick would otherwise go unseen."""
    cache_path = path.parent / VERIFIED
    stat = path.stat()
    key = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(path.name)
    if isinstance(hit, list) and hit[:3] == key:
        return hit[3]
    digest = sha256_file(path)
    if time.time_ns() - stat.st_mtime_ns < RACY_S * 1e9:
        return digest
    with file_lock(path.parent / f"{VERIFIED}.lock"):
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[path.name] = key + [digest]
        _write_json(cache_path, cache)
    return digest


def check_footer(path: Path, hint: str) -> pq.FileMetaData:
    """The shard's footer (row groups, schema), or CorruptShardError naming the file and `hint`."""
    try:
        shard = pq.ParquetFile(path)
        metadata = shard.metadata
        schema = shard.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise CorruptShardError(f"corrupt parquet shard {path}: {e}; {hint}") from e
    if "text" not in schema.names:
        raise CorruptShardError(f"shard {path} has no 'text' column (columns: {schema.names}); {hint}")
    return metadata


def can_refetch(manifest: dict | None) -> bool:
    """Whether bad shards of this manifest are fetched again (downloaded ones, network allowed)."""
    return manifest is not None and manifest.get("source") == "online" and bool(manifest.get("base_url")) and not hf_offline()


def verify_shards(data_dir: Path | None = None, num_workers: int = 8) -> list[Path]:
    """Check every shard before a run reads any: against the manifest (when there is one) its size
    and sha256, then its footer. A downloaded shard that fails is fetched again from the manifest's
    base_url (once, whatever the number of ranks); any other failure raises CorruptShardError (one
    line: the file, what is wrong, the command that fixes it). Returns the shards."""
    files = list_parquet_files(data_dir)
    data_dir = files[0].parent
    manifest = read_manifest(data_dir)
    hint = rebuild_hint(manifest)
    if manifest is not None:
        entries = {entry["file"]: entry for entry in manifest.get("shards", [])}
        for path in files:
            if path.name not in entries:
                raise CorruptShardError(f"shard {path} is not in {data_dir / MANIFEST}; {hint}")
        with ThreadPoolExecutor(max_workers=num_workers) as pool:  # hashlib releases the GIL
            digests = dict(zip(files, pool.map(cached_sha256, files)))
        for path in files:
            entry = entries[path.name]
            size = path.stat().st_size
            if "bytes" in entry and size != entry["bytes"]:
                problem = f"has {size} bytes, {MANIFEST} says {entry['bytes']}"
            elif entry.get("sha256") is not None and digests[path] != entry["sha256"]:
                problem = f"fails its checksum (sha256 {digests[path][:16]}..., {MANIFEST} says {entry['sha256'][:16]}...)"
            else:
                continue
            if not (can_refetch(manifest) and entry.get("sha256")):
                raise CorruptShardError(f"shard {path} {problem}; {hint}")
            url = f"{manifest['base_url']}/{path.name}"
            print0(f"shard {path} {problem}: fetching it again from {url}")
            try:
                download_file(url, path, check_parquet, sha256=entry["sha256"], headers=hub_headers(url), replace_mismatch=True)
            except DownloadError as e:
                raise CorruptShardError(f"shard {path} {problem} and fetching it again failed ({e.reason}); {hint}") from None
    for path in files:
        check_footer(path, hint)
    return files


# ---------------------------------------------------------------------------------------------
# reading shards

def list_parquet_files(data_dir: Path | None = None) -> list[Path]:
    """All shards in `data_dir` (default $NANOCHAT_BASE_DIR/base_data), sorted by index."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    files = sorted(data_dir.glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"no shards in {data_dir}: {NO_SHARDS_HINT}")
    return files


def split_files(split: str, data_dir: Path | None = None) -> list[Path]:
    """'train' = every shard but the last, 'val' = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        found = f"found {files[0].name} only"
        raise FileNotFoundError(f"need at least 2 shards (train + val) in {files[0].parent}, {found}: {NO_SHARDS_HINT}")
    return files[:-1] if split == "train" else files[-1:]


def open_shard(path: Path) -> pq.ParquetFile:
    """The shard as a ParquetFile with a `text` column (page checksums verified on read), or an
    error naming the file."""
    hint = "delete it and re-run `python -m nanochat.dataset`"
    try:
        shard = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise CorruptShardError(f"corrupt parquet shard {path}: {e} ({hint})") from e
    if "text" not in shard.schema_arrow.names:
        raise CorruptShardError(f"shard {path} has no 'text' column (columns: {shard.schema_arrow.names})")
    return shard


def iter_row_groups(
    split: str,
    start: tuple[int, int] = (0, 0),
    rank: int = 0,
    world_size: int = 1,
    data_dir: Path | None = None,
) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """One pass over the split's row groups: yields (texts, (file_idx, row_group_idx)).

    Row groups are dealt round-robin to ranks by their global index in the split, so ranks read
    disjoint data whose union is the whole split. `start` is the position to resume from
    (inclusive); a rank resuming from a position it was given gets the same sequence again.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    start_file, start_rg = start
    if start_file < 0 or start_rg < 0:
        raise ValueError(f"start must be a non-negative (file_idx, row_group_idx), got {start}")
    files = split_files(split, data_dir)
    global_index = sum(open_shard(path).num_row_groups for path in files[:start_file])
    for file_idx in range(start_file, len(files)):
        path = files[file_idx]
        shard = open_shard(path)
        first = start_rg if file_idx == start_file else 0
        global_index += min(first, shard.num_row_groups)
        for rg_idx in range(first, shard.num_row_groups):
            if global_index % world_size == rank:
                try:
                    texts = shard.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                except (pa.ArrowException, OSError) as e:
                    raise CorruptShardError(f"corrupt parquet shard {path}: row group {rg_idx}: {e}") from e
                yield texts, (file_idx, rg_idx)
            global_index += 1


def iter_texts(
    split: str, max_chars: int | None = None, doc_cap: int | None = None, data_dir: Path | None = None
) -> Iterator[str]:
    """Documents of the split in order (for the tokenizer trainer), after verify_shards: each cut
    to `doc_cap` chars, stopping once `max_chars` chars in total were yielded."""
    verify_shards(data_dir)
    total = 0
    for texts, _ in iter_row_groups(split, data_dir=data_dir):
        for text in texts:
            if max_chars is not None and total >= max_chars:
                return
            if doc_cap is not None:
                text = text[:doc_cap]
            total += len(text)
            yield text


# ---------------------------------------------------------------------------------------------
# online: download shards

def check_parquet(path: Path) -> None:
    """Validation for downloads: a readable parquet file with a string `text` column."""
    schema = pq.ParquetFile(path).schema_arrow
    if "text" not in schema.names:
        raise ValueError(f"no 'text' column (columns: {schema.names})")
    if not pa.types.is_string(schema.field("text").type) and not pa.types.is_large_string(schema.field("text").type):
        raise ValueError(f"'text' column has type {schema.field('text').type}, expected string")


def shard_indices(num_files: int, val_index: int = MAX_SHARD_INDEX) -> list[int]:
    """Train shards 0..num_files-1 (-1: all of them) followed by the val shard."""
    if num_files == -1:
        num_files = val_index
    if not 0 <= num_files <= val_index:
        raise ValueError(f"num_files must be -1 (all) or in [0, {val_index}], got {num_files}")
    return list(range(num_files)) + [val_index]


def hub_shard_checksums(base_url: str) -> dict[str, str] | None:
    """{shard file: sha256} from the hub's listing API when `base_url` is a hub repo's resolve URL
    (…/datasets/<owner>/<name>/resolve/<revision>); None for any other server or no listing."""
    match = HUB_RESOLVE_URL.match(base_url.rstrip("/"))
    if match is None:
        return None
    try:
        tree = hub_tree(match["repo"], match["revision"], endpoint=match["endpoint"])
    except DownloadError as e:
        print0(f"note: no file listing from the hub ({e.reason}): checksums come from the downloaded files")
        return None
    return {path: meta["sha256"] for path, meta in tree.items() if "/" not in path and meta.get("sha256")}


def _shard_entry(path: Path, name: str, sha256: str, sha256_from: str) -> dict:
    return {"file": name, "bytes": path.stat().st_size, "sha256": sha256, "sha256_from": sha256_from}


def download_shards(
    indices: list[int],
    base_url: str,
    data_dir: Path,
    num_workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    dataset: str = DEFAULT_DATASET,
) -> dict[int, str]:
    """Check the shards already here, then download the missing and bad ones in parallel, each
    verified against the hub's sha256 where it lists one and recorded in the manifest. Returns
    {index: reason} for the ones that failed."""
    from tqdm import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    hub = None if hf_offline() else hub_shard_checksums(base_url)
    known = {entry["file"]: entry for entry in (read_manifest(data_dir) or {}).get("shards", [])}
    missing, recorded = [], []
    for i in indices:
        name, path = shard_name(i), data_dir / shard_name(i)
        if not path.exists():
            missing.append(i)
            continue
        expected = (hub or {}).get(name) or known.get(name, {}).get("sha256")
        digest = cached_sha256(path)
        if expected is not None and digest != expected:
            print0(f"{name}: sha256 {digest[:16]}... is not the expected {expected[:16]}...: fetching it again")
            path.unlink()
            missing.append(i)
        elif name not in known or known[name].get("sha256") != digest:
            recorded.append(_shard_entry(path, name, digest, "hub" if hub and name in hub else "file"))
    if recorded:
        record_shards(data_dir, recorded, source="online", base_url=base_url, dataset=dataset)
    print0(f"{len(indices) - len(missing)}/{len(indices)} shards in {data_dir}, downloading {len(missing)} from {base_url}")
    failed: dict[int, str] = {}
    if not missing:
        return failed
    if hf_offline():
        return {i: "HF_HUB_OFFLINE=1 forbids downloads" for i in missing}

    def fetch(index: int) -> None:
        name = shard_name(index)
        expected = (hub or {}).get(name)
        dest = data_dir / name

        def check_and_record(tmp: Path) -> None:  # runs before `dest` appears: no shard without its entry
            check_parquet(tmp)
            entry = _shard_entry(tmp, name, expected or sha256_file(tmp), "hub" if expected else "download")
            record_shards(data_dir, [entry], source="online", base_url=base_url, dataset=dataset)

        url = f"{base_url}/{name}"
        download_file(url, dest, check_and_record, retries, backoff, sha256=expected, headers=hub_headers(url))

    pool = ThreadPoolExecutor(max_workers=num_workers)
    try:
        futures = {pool.submit(fetch, i): i for i in missing}
        for future in tqdm(as_completed(futures), total=len(futures), desc="shards", unit="shard"):
            try:
                future.result()
            except DownloadError as e:
                failed[futures[future]] = e.reason
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: start no new downloads
    return failed


# ---------------------------------------------------------------------------------------------
# offline: the local corpus as shards

def build_local_corpus(
    out_dir: Path,
    target_mb: float = 40,
    val_fraction: float = 0.05,
    shard_mb: float = 8,
    row_group_docs: int = ROW_GROUP_DOCS,
    seed: int = LOCAL_SEED,
    show_progress: bool = True,
) -> dict:
    """Write the local corpus (nanochat.local_corpus.local_shards) into `out_dir`: the shards,
    then manifest.json with each shard's size and sha256; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, info = local_shards(target_mb, val_fraction, shard_mb, seed, show_progress)
    manifest = {"source": "local", **info, "shards": []}
    for index, texts in enumerate(shards):
        path = out_dir / shard_name(index)
        write_shard(texts, path, row_group_docs)
        split = "val" if index == len(shards) - 1 else "train"
        manifest["shards"].append(
            {"file": path.name, "split": split, "docs": len(texts), "chars": sum(map(len, texts)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    _write_json(out_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# command line

@dataclass
class DatasetConfig(Flags):
    """Download pretraining shards (FineWeb-Edu or ClimbMix), or build a local corpus offline."""

    num_files: int = field(default=8, metadata={"short": "-n", "help": "train shards to download (-1: all of the dataset's); plus the val shard"})
    num_workers: int = field(default=4, metadata={"short": "-w", "help": "parallel downloads"})
    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata={"choices": tuple(ONLINE_DATASETS), "help": "online: fineweb_edu (1822 train shards) or climbmix (6542)"},
    )
    base_url: str = field(
        default="",
        metadata={"help": "where shard_XXXXX.parquet live (default: env NANOCHAT_DATA_URL, else --dataset's repo at $HF_ENDPOINT)"},
    )
    source: str = field(default="auto", metadata={"choices": ("auto", "online", "local"), "help": "auto: online if base_url answers, else local"})
    val_index: int = field(default=-1, metadata={"help": "index of the val shard online (-1: --dataset's last shard; for mirrors and tests)"})
    retries: int = field(default=5, metadata={"help": "download retries per shard"})
    backoff: float = field(default=2.0, metadata={"help": "seconds before the first retry, doubling each time"})
    target_mb: float = field(default=40, metadata={"help": "local: MB of text to gather (0: all there is)"})
    shard_mb: float = field(default=8, metadata={"help": "local: MB of text per train shard"})
    val_fraction: float = field(default=0.05, metadata={"help": f"local: share of documents held out in the last shard (>= {MIN_VAL_DOCS})"})
    force: bool = field(default=False, metadata={"help": "replace the shards already in base_data"})

    def validate(self) -> None:
        super().validate()
        self.base_url = self.base_url or default_base_url(self.dataset)
        if self.val_index == -1:
            self.val_index = ONLINE_DATASETS[self.dataset].val_index
        check(self.num_files >= -1, f"--num_files: expected -1 (all) or >= 0, got {self.num_files}")
        check(self.num_files <= self.val_index, f"--num_files: at most {self.val_index} train shards exist, got {self.num_files}")
        check(self.num_workers >= 1, f"--num_workers: expected >= 1, got {self.num_workers}")
        check(self.val_index >= 0, f"--val_index: expected -1 (the dataset's) or >= 0, got {self.val_index}")
        check(self.retries >= 0 and self.backoff >= 0, f"--retries/--backoff: expected >= 0, got {self.retries}/{self.backoff}")
        check(self.target_mb >= 0, f"--target_mb: expected >= 0, got {self.target_mb}")
        check(self.shard_mb > 0, f"--shard_mb: expected > 0, got {self.shard_mb}")
        check(0 < self.val_fraction < 1, f"--val_fraction: expected a number in (0, 1), got {self.val_fraction}")


def is_local_corpus(manifest: dict | None) -> bool:
    return manifest is not None and manifest.get("source", "local") == "local"


def run_online(cfg: DatasetConfig, data_dir: Path) -> None:
    if is_local_corpus(read_manifest(data_dir)):
        if not cfg.force:
            raise UserError(f"{data_dir} holds the local corpus; --force replaces it with downloaded shards, --source=local keeps it")
        clear_shards(data_dir)
    here = (read_manifest(data_dir) or {}).get("dataset")
    if here is not None and here != cfg.dataset:
        if not cfg.force:
            raise UserError(f"{data_dir} holds {here} shards; --force replaces them with --dataset={cfg.dataset} (then retrain the tokenizer), --dataset={here} keeps them")
        clear_shards(data_dir)
    indices = shard_indices(cfg.num_files, cfg.val_index)
    failed = download_shards(indices, cfg.base_url, data_dir, cfg.num_workers, cfg.retries, cfg.backoff, dataset=cfg.dataset)
    names = ", ".join(shard_name(i) for i in sorted(failed))
    if failed and hf_offline():
        raise UserError(f"HF_HUB_OFFLINE=1 and {len(failed)} of {len(indices)} shards are not in {data_dir} ({names}): unset it to download them")
    if failed:
        for index, reason in sorted(failed.items()):
            print0(f"  failed: {shard_name(index)}: {reason}")
        raise UserError(f"{len(failed)} of {len(indices)} shards failed: {names}; re-run to resume")
    print0(f"{len(indices)} shards ready in {data_dir}")


def run_local(cfg: DatasetConfig, data_dir: Path) -> None:
    existing = sorted(data_dir.glob(SHARD_GLOB)) if data_dir.is_dir() else []
    manifest = read_manifest(data_dir)
    if existing and not cfg.force:
        if is_local_corpus(manifest):
            print0(f"local corpus already in {data_dir} ({manifest['num_docs']} docs); --force rebuilds it")
            return
        raise UserError(f"{data_dir} holds {len(existing)} shards but no local-corpus {MANIFEST} (downloaded, or an interrupted local build); --force replaces them")
    if cfg.force:
        clear_shards(data_dir)
    manifest = build_local_corpus(data_dir, cfg.target_mb, cfg.val_fraction, cfg.shard_mb)
    total = sum(s["chars"] for s in manifest["shards"])
    by_source = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in manifest["chars_by_source"].items())
    shards = len(manifest["shards"])
    print0(f"local corpus: {manifest['num_docs']} docs, {total / 1e6:.1f}M chars in {shards} shards ({by_source}) -> {data_dir}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(DatasetConfig, argv, prog="python -m nanochat.dataset")
    run_main(prepare, cfg)


def prepare(cfg: DatasetConfig) -> None:
    """Download the shards or build the local corpus, as --source says (auto: keep what is here)."""
    data_dir = default_data_dir()
    source = cfg.source
    manifest = read_manifest(data_dir)
    if source == "auto" and manifest is not None:
        source = "local" if is_local_corpus(manifest) else "online"  # keep what is here
    if source == "auto":
        source = "online" if reachable(cfg.base_url) else "local"
        if source == "local":
            reason = "HF_HUB_OFFLINE=1" if hf_offline() else f"{cfg.base_url} is unreachable"
            print0(f"{reason}: building the local corpus instead (--source=local)")
    if source == "online":
        run_online(cfg, data_dir)
    else:
        run_local(cfg, data_dir)


if __name__ == "__main__":
    main()
