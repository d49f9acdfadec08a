"""Training data: find (image, label) pairs in a folder, preprocess them once into one ``.npz`` cache.

``build_cache`` needs SimpleITK (it reads and reorients scans); ``CachedCases.load`` reads the cache with
NumPy only, so training on a machine without SimpleITK works from the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..models.registry import InputContract

__all__ = ["Case", "load_case_folder", "build_cache", "CachedCases", "CACHE_FORMAT"]

CACHE_FORMAT = "napari-medmamba-train-cache-1"
_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class Case(NamedTuple):
    case_id: str
    image_path: Path
    label_path: Path
    labelled: tuple[int, ...] | None = None
    """Label values that were contoured in this case (partial labels); None: every class was."""


def _stem(path: Path) -> str | None:
    name = path.name
    if name.startswith("."):  # hidden files, e.g. macOS "._hippocampus_001.nii.gz" in MSD archives
        return None
    for ext in _EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def _sub(folder: Path, names: Sequence[str]) -> Path:
    for n in names:
        if (folder / n).is_dir():
            return folder / n
    raise FileNotFoundError(f"{folder}: no {' or '.join(names)} folder")


def _openkbp_cases(folder: Path) -> list[Case]:
    """OpenKBP as converted in ``../shared/data/openkbp``: ``pt_N_ct.nii.gz`` + ``pt_N_oar.nii.gz`` and a
    ``cases.tsv`` whose third column lists the contoured organs as ``Name=value`` pairs."""
    cases = []
    lines = (folder / "cases.tsv").read_text().splitlines()
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) < 3 or not cols[0].strip():
            continue
        cid = cols[0].strip()
        values = tuple(sorted(int(item.split("=")[1]) for item in cols[2].split(",") if "=" in item))
        image, label = folder / f"{cid}_ct.nii.gz", folder / f"{cid}_oar.nii.gz"
        if not image.is_file() or not label.is_file():
            raise FileNotFoundError(f"{folder}: case {cid} of cases.tsv has no {image.name} / {label.name}")
        cases.append(Case(cid, image, label, values))
    return sorted(cases, key=lambda c: (len(c.case_id), c.case_id))


def load_case_folder(folder: str | Path) -> list[Case]:
    """The labelled cases of ``folder``, sorted by id.

    Layouts: ``imagesTr/NAME.nii.gz`` (MSD, ours) or ``imagesTr/NAME_0000.nii.gz`` (nnU-Net raw, single
    channel), with ``labelsTr/NAME.nii.gz``; ``images``/``labels`` folder names also work, and any
    format ``read_volume`` reads. Labels without an image raise ``FileNotFoundError``. A folder with a
    ``cases.tsv`` and ``pt_N_ct.nii.gz`` / ``pt_N_oar.nii.gz`` files is read as OpenKBP, with partial labels.
    """
    folder = Path(folder)
    if (folder / "cases.tsv").is_file() and any(folder.glob("*_oar.nii.gz")):
        return _openkbp_cases(folder)
    images = {s: p for p in _sub(folder, ("imagesTr", "images")).iterdir() if (s := _stem(p)) is not None}
    cases = []
    for label in sorted(_sub(folder, ("labelsTr", "labels")).iterdir()):
        cid = _stem(label)
        if cid is None:
            continue
        image = images.get(cid) or images.get(f"{cid}_0000")
        if image is None:
            raise FileNotFoundError(f"{label}: no image {cid}.* or {cid}_0000.* in the images folder")
        cases.append(Case(cid, image, label))
    if not cases:
        raise FileNotFoundError(f"{folder}: no labelled cases found")
    return cases


def _resample(array: np.ndarray, geometry, spacing_xyz: tuple[float, ...], nearest: bool):
    """Resample onto a grid of ``spacing_xyz`` covering the same extent (SimpleITK)."""
    import SimpleITK as sitk

    from ..inference.preprocessing import working_shape
    from ..io.volume import Geometry

    shape = working_shape(array.shape, geometry.spacing_zyx, tuple(spacing_xyz[::-1]))
    target = Geometry(spacing_xyz, geometry.origin, geometry.direction)
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    out = sitk.Resample(image, shape[::-1], sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                        target.origin, target.spacing, target.direction, 0.0,
                        image.GetPixelID() if nearest else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out), target


def _prepare(case: Case, contract) -> tuple[np.ndarray, np.ndarray]:
    from ..inference.preprocessing import normalize, plan_orientation
    from ..io import read_volume

    img, lab = read_volume(case.image_path), read_volume(case.label_path)
    if img.array.shape != lab.array.shape or not img.geometry.isclose(lab.geometry, atol=1e-3):
        raise ValueError(f"{case.case_id}: image and label grids differ ({img.array.shape} vs {lab.array.shape})")
    labels = np.rint(lab.array).astype(np.int64)  # some label files are float
    if labels.min() < 0 or labels.max() >= contract.num_classes:
        raise ValueError(f"{case.case_id}: labels outside 0..{contract.num_classes - 1}")
    orient = plan_orientation(img.geometry, img.array.shape, contract.orientation)
    image, labels, geometry = orient.apply(img.array), orient.apply(labels), orient.geometry
    if contract.target_spacing is not None:
        target_xyz = tuple(contract.target_spacing[::-1])
        if not np.allclose(geometry.spacing, target_xyz, rtol=0.02):
            image, _ = _resample(image.astype(np.float32), geometry, target_xyz, nearest=False)
            labels, _ = _resample(labels.astype(np.int16), geometry, target_xyz, nearest=True)
    image = normalize(np.ascontiguousarray(image), contract)
    return image.astype(np.float16), np.ascontiguousarray(labels).astype(np.uint8)


def build_cache(cases: Sequence[Case], path: str | Path, model_name: str = "lightm_unet_3d",
                source: str = "", licence: str = "", log: Callable[[str], None] | None = None,
                citation: Sequence[str] = ()) -> Path:
    """Read, reorient, resample (when the spacing differs) and normalise ``cases`` as the model contract
    says; write float16 images and uint8 labels, flat and concatenated, to ONE compressed ``.npz``."""
    from ..models.registry import get_model_spec
    from ..models import zoo  # noqa: F401  (registers the models)

    contract = get_model_spec(model_name).contract
    images, labels, shapes = [], [], []
    present = np.ones((len(cases), contract.num_classes), dtype=bool)
    for i, case in enumerate(cases):
        if case.labelled is not None:
            present[i, 1:] = False
            present[i, [v for v in case.labelled if 0 < v < contract.num_classes]] = True
        im, lb = _prepare(case, contract)
        images.append(im.ravel())
        labels.append(lb.ravel())
        shapes.append(im.shape)
        if log is not None and (i + 1) % 50 == 0:
            log(f"cached {i + 1}/{len(cases)} cases")
    sizes = [int(np.prod(s)) for s in shapes]
    meta = {"format": CACHE_FORMAT, "model": model_name, "orientation": contract.orientation,
            "target_spacing": contract.target_spacing, "normalization": contract.normalization,
            "label_names": list(contract.label_names), "source": source, "licence": licence,
            "citation": list(citation)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, images=np.concatenate(images), labels=np.concatenate(labels),
                            shapes=np.asarray(shapes, dtype=np.int64),
                            offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                            case_ids=np.asarray([c.case_id for c in cases], dtype=str), present=present,
                            meta=np.asarray(json.dumps(meta)))
    return path


@dataclass
class CachedCases:
    """Preprocessed cases: ``images[i]`` float16 (z, y, x), ``labels[i]`` uint8, ``case_ids[i]``;
    ``present[i, c]`` is False where class ``c`` was not contoured in case ``i`` (partial labels)."""

    case_ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]
    meta: dict
    present: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | Path) -> "CachedCases":
        """Read a cache written by :func:`build_cache` (NumPy only, no pickles)."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path}: not a napari-medmamba training cache")
            images, labels, shapes, offsets = z["images"], z["labels"], z["shapes"], z["offsets"]
            ids = [str(i) for i in z["case_ids"]]
            present = z["present"] if "present" in z.files else None
        ims = [images[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]
        lbs = [labels[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]
        return cls(ids, ims, lbs, meta, present)

    def __len__(self) -> int:
        return len(self.case_ids)

    def subset(self, ids: Sequence[str]) -> "CachedCases":
        """The cases named in ``ids`` (in that order); unknown ids raise ``KeyError``."""
        index = {c: i for i, c in enumerate(self.case_ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"cases not in the cache: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        sel = [index[i] for i in ids]
        return CachedCases([self.case_ids[i] for i in sel], [self.images[i] for i in sel],
                           [self.labels[i] for i in sel], self.meta,
                           None if self.present is None else self.present[sel])

    def cropped_to_body(self, contract: InputContract, multiple: int = 1) -> "CachedCases":
        """Every case cut to its body's box, as the inference engine tiles a CT (``inference.body_crop``): the
        same HU threshold (the cached images are mapped back to HU through ``ct_stats``), margin and rounding
        to ``multiple``."""
        from ..inference.body_crop import normalised_body_box

        images, labels = [], []
        for image, label in zip(self.images, self.labels):
            box = normalised_body_box(image, contract, multiple) or (slice(None),) * 3
            images.append(image[box])
            labels.append(label[box])
        return CachedCases(list(self.case_ids), images, labels, self.meta, self.present)

    def present_mask(self, num_classes: int) -> np.ndarray:
        """(n_cases, num_classes) bool: which classes each case has contoured (all True without partial labels)."""
        return np.ones((len(self), num_classes), bool) if self.present is None else self.present
