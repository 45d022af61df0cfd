"""`datasets` sources: a dataset saved with `save_to_disk` (a directory, optionally `:SPLIT`) or a Hugging
Face hub dataset (`hf://NAME[/CONFIG][:SPLIT][@REVISION]`) streamed through `datasets.load_dataset`.

Offline, a hub name is read from the local hub cache (what `huggingface-cli download` leaves) and the
cached snapshot's commit is recorded; without a cached copy it fails in one line saying how to get one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launch.data.rows import (
    HUB_PREFIX,
    VAL_SPLITS,
    Segment,
    as_segments,
    dataset_rows,
    no_column,
    split_suffix,
    whole_documents,
)
from launch.runtime.errors import UserError


def parse_hub_name(source: str) -> tuple[str, str | None, str | None, str | None]:
    """'hf://NAME[/CONFIG][:SPLIT][@REVISION]' -> (NAME, CONFIG, SPLIT, REVISION). NAME is OWNER/NAME
    (or a bare NAME for the few datasets without an owner); a third path part is the config."""
    body = source[len(HUB_PREFIX) :]
    body, at, revision = body.partition("@")
    body, colon, split = body.partition(":")
    parts = body.strip("/").split("/")
    if not parts[0] or len(parts) > 3 or (at and not revision) or (colon and not split):
        raise UserError(
            f"data source {source!r}: expected hf://NAME[/CONFIG][:SPLIT][@REVISION], e.g. "
            f"hf://HuggingFaceFW/fineweb-edu/sample-10BT:train"
        )
    name = "/".join(parts[:2])
    config = parts[2] if len(parts) == 3 else None
    return name, config, split or None, revision or None


def _offline_error(name: str, revision: str | None, why: str) -> UserError:
    rev = f" --revision {revision}" if revision else ""
    return UserError(
        f"hf://{name}: cannot reach the Hugging Face hub ({why}) and no copy is in the local cache; on a "
        f"machine with network run `huggingface-cli download --repo-type dataset {name}{rev}` (same HF_HOME; "
        f"then it works offline), or `datasets.load_dataset(...).save_to_disk(DIR)` and use DIR"
    )


def _pick_split(available, wanted: str | None, usage: str, where: str) -> str:
    available = list(available)
    if wanted is None:
        candidates = ("train",) if usage == "train" else VAL_SPLITS
        wanted = next((s for s in candidates if s in available), None)
        if wanted is None:
            raise UserError(
                f"{where}: no {usage} split among {', '.join(available)}; name one as {where}:SPLIT"
            )
    if wanted not in available:
        raise UserError(f"{where}: no split {wanted!r}; splits are {', '.join(available)}")
    return wanted


@dataclass
class DatasetSource:
    """A `datasets` dataset: saved with `save_to_disk` (path) or on the hub (hf://)."""

    source: str
    usage: str = "train"  # train | val: which split to pick when the source names none
    text_field: str = "text"
    name: str = ""
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    _resolved: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.source.startswith(HUB_PREFIX):
            self.name, self.config, self.split, self.revision = parse_hub_name(self.source)
        else:
            self.name, self.split = split_suffix(self.source)

    @property
    def hub(self) -> bool:
        return self.source.startswith(HUB_PREFIX)

    def describe(self) -> str:
        return self.source

    def _open_saved(self):
        import datasets

        try:
            ds = datasets.load_from_disk(self.name)
        except IndexError:  # datasets cannot load a saved Dataset of zero rows (no arrow files)
            raise UserError(f"{self.name}: no text (the saved dataset has no rows)") from None
        except Exception as e:
            raise UserError(f"cannot read saved dataset {self.name}: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            self.split = _pick_split(ds.keys(), self.split, self.usage, self.name)
            ds = ds[self.split]
        elif self.split is not None:
            raise UserError(f"{self.name} is a single saved Dataset: drop the :{self.split} split")
        self._resolved["fingerprint"] = ds._fingerprint
        return ds

    def _open_hub(self):
        import datasets

        kwargs = {"streaming": True, "revision": self.revision}
        try:
            ds = datasets.load_dataset(self.name, self.config, **kwargs)
            self._resolved["revision"] = self.revision or _hub_commit(self.name, self.revision)
        except (ConnectionError, OSError) as e:
            # Offline (HF_HUB_OFFLINE=1) or unreachable: a snapshot in the hub cache (huggingface-cli
            # download) is a local dataset repository; `datasets` reads it as one.
            local, commit = _cached_snapshot(self.name, self.revision)
            if local is None:
                why = "HF_HUB_OFFLINE=1" if _hub_offline() else str(e).splitlines()[0][:120]
                raise _offline_error(self.name, self.revision, why) from None
            try:
                ds = datasets.load_dataset(local, self.config, streaming=True)
            except Exception as e2:
                raise UserError(
                    f"{self.source}: cached copy {local} unreadable: {str(e2).splitlines()[0]}"
                ) from None
            self._resolved["revision"] = commit
        except ValueError as e:  # unknown config / split names
            raise UserError(f"{self.source}: {str(e).splitlines()[0]}") from None
        except datasets.exceptions.DatasetNotFoundError as e:
            raise UserError(f"{self.source}: {str(e).splitlines()[0]}") from None
        self.split = _pick_split(ds.keys(), self.split, self.usage, self.source)
        return ds[self.split]

    def open(self):
        return self._open_hub() if self.hub else self._open_saved()

    def key(self) -> list:
        return [
            self.source if self.hub else str(Path(self.name).resolve()),
            self.config,
            self.split,
            self.usage,
            self.text_field,
        ]

    def record(self) -> list[dict]:
        """Dataset name, config, split and revision (hub) or fingerprint (saved): a changed source re-tokenizes."""
        if not self._resolved:
            self.open()
        rec = {
            "dataset": self.name if self.hub else str(Path(self.name).resolve()),
            "config": self.config,
            "split": self.split,
        }
        return [{**rec, **self._resolved}]

    def segments(self) -> Iterator[Segment]:
        ds = self.open()
        if ds.column_names is not None and self.text_field not in ds.column_names:
            raise no_column(self.source, self.text_field, ds.column_names)
        yield from as_segments(dataset_rows(ds, self.source, self.text_field))

    def documents(self) -> Iterator[str]:
        return whole_documents(self.segments())


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(name: str, revision: str | None) -> tuple[str | None, str | None]:
    """The local hub-cache snapshot of a dataset repository (and its commit), if one was downloaded."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:
        return None, None
    return path, Path(path).name


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub revision points at now (so the index pins what was read)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha
    except Exception:
        return revision
