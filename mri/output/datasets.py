"""Generated samples as segmentation datasets: BraTS case folders and nnU-Net v2 raw datasets (docs/cohorts.md).

`generate.py --format brats|nnunet` hands every sample of a joint image+label snapshot (modalities + `seg_*` label
channels, torch_utils/label_channels.py) to a `DatasetWriter` through generate.generate_samples' writer protocol
(start / write / finish / unit, plus item_name / done for resumable, shardable cases):

- `brats`: one folder per case, `BraTS-SYN-<seed:05d>-<class index:03d>/` with `<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`
  (BraTS 2023 naming, labels 1 NETC, 2 SNFH, 3 ET, mri.output.cases.synthetic_case_id), and the sidecar
  `<case>-generation.json`. The folder is written hidden and renamed into place; the sidecar comes last.
- `nnunet`: nnU-Net v2's raw layout: `imagesTr/<case>_0000..000K.<ending>`, `labelsTr/<case>.<ending>`, a
  `dataset.json` (channel_names, labels, numTraining, file_ending; for the BraTS label channels the BraTS regions
  the way nnU-Net's own BraTS 2021 conversion declares them, here for the BraTS 2023 label values), and the sidecars
  in `provenance/<case>.json`, which nnU-Net does not read. Volumes are `.nii.gz`; 2D slices are 16-bit grey `.png`
  images and 8-bit `.png` label maps, read by nnU-Net's NaturalImage2DIO (nnU-Net v2's documented way for 2D data).

Intensities are (x + 1) / 2 in [0, 1] (float32 NIfTI, 16-bit PNG), the labels the decoded map 0..K (mri.seg's rule).
Volumes carry the archive's space (mri.output.volumes.resolve_space) or, with `native_grid`, the original BraTS grid.
Real BraTS cases (`--with-real`) go into the same dataset under their own ids (`add_real_case`).
"""

import json
import os
import shutil

import numpy as np

import dnnlib
from mri.output.cases import synthetic_case_id
from mri.output.manifest import write_json
from mri.output.nifti import save_volume_nifti
from mri.seg import SEG_CHANNELS
from mri.sources.brats import MODALITIES
from torch_utils.label_channels import label_channel_indices, onehot_to_labelmap

FORMATS = ('brats', 'nnunet')
SIDECAR_DIR = 'provenance'

# nnU-Net v2 region-based training for BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET), declared the way nnU-Net's
# Dataset137_BraTS21 conversion declares its regions: whole tumour = every label, tumour core = necrosis + enhancing,
# enhancing tumour. regions_class_order names the label each region's voxels get when nnU-Net converts predicted
# regions back to a label map, later regions overwriting earlier ones: WT -> 2 (SNFH), TC -> 1 (NETC), ET -> 3.
BRATS_REGIONS = {'background': 0, 'whole tumor': [1, 2, 3], 'tumor core': [1, 3], 'enhancing tumor': [3]}
BRATS_REGIONS_CLASS_ORDER = [2, 1, 3]
BRATS_LABELS = {'background': 0, 'NETC': 1, 'SNFH': 2, 'ET': 3}


class DatasetOutputError(ValueError):
    """A dataset cannot be written as asked (channels missing, wrong kind of snapshot); one line."""


def sample_case_id(seed, class_index) -> str:
    """The case of a generated sample: BraTS-SYN-<seed>-<class index> (seeds 0-99999, classes 0-999)."""
    if not (0 <= int(seed) <= 99999):
        raise DatasetOutputError(f'--seeds {seed}: dataset cases are named BraTS-SYN-<seed:05d>-<class>: use seeds 0-99999')
    if not (0 <= int(class_index) <= 999):
        raise DatasetOutputError(f'--class: {int(class_index) + 1} classes; dataset cases are named '
                                 f'BraTS-SYN-<seed>-<class:03d>: ask for at most 1000 classes')
    return synthetic_case_id(seed, class_index)


def nnunet_dataset_json(image_channels, label_channels, num_training, file_ending, regions=True, name=None,
                        description=None) -> dict:
    """nnU-Net v2's dataset.json (its dataset_format.md): channel_names, labels (or BraTS regions with
    regions_class_order), numTraining, file_ending."""
    out = {'channel_names': {str(i): name_ for i, name_ in enumerate(image_channels)}}
    if tuple(label_channels) == SEG_CHANNELS:
        out['labels'] = dict(BRATS_REGIONS if regions else BRATS_LABELS)
        if regions:
            out['regions_class_order'] = list(BRATS_REGIONS_CLASS_ORDER)
    else:
        out['labels'] = {'background': 0, **{c[len('seg_'):].upper(): k + 1 for k, c in enumerate(label_channels)}}
    out.update(numTraining=int(num_training), file_ending=file_ending)
    if name:
        out['name'] = name
    if description:
        out['description'] = description
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files of one case


def _save_png(array, path, bits):
    import PIL.Image
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        PIL.Image.fromarray(array.astype(np.uint16 if bits == 16 else np.uint8)).save(tmp)
    return path


def _unit(channel):
    """[-1, 1] -> [0, 1] float32 (clipped: a generator's output may overshoot)."""
    return ((np.asarray(channel, np.float32) + 1) / 2).clip(0, 1)


class DatasetWriter:
    """Writes generated samples as cases of a BraTS or nnU-Net v2 dataset (module docstring)."""

    unit = 'cases'
    dataset = True

    def __init__(
        self,
        desc,               # the snapshot's dataset description (channels, kind, space)
        outdir,             # the dataset folder
        fmt,                # 'brats' or 'nnunet'
        native_grid=False,  # volumes on the original BraTS grid (mri.volume_space)
        regions=True,       # nnunet + BraTS labels: region-based dataset.json (else the three labels)
        verbose=True,
    ):
        if fmt not in FORMATS:
            raise DatasetOutputError(f'--format {fmt}: choose one of {", ".join(FORMATS)}')
        self.desc, self.outdir, self.fmt, self.native_grid, self.regions = desc, outdir, fmt, native_grid, regions
        self.verbose = verbose
        self.channels = list(desc.get('channels') or [])
        self.volumes = (desc.get('kind') == 'volumes') or len(desc.get('image_shape') or []) == 4
        self.label_idx = label_channel_indices(self.channels)
        self.image_idx = [i for i in range(len(self.channels)) if i not in self.label_idx]
        self.image_names = [self.channels[i] for i in self.image_idx]
        self.label_names = [self.channels[i] for i in self.label_idx]
        self.space = None
        self._check_channels()

    def _check_channels(self):
        if not self.channels:
            raise DatasetOutputError(f'--format {self.fmt}: the snapshot records no channel names; a dataset needs '
                                     f'named modalities and seg_* label channels (dataset_tool.py --modalities all --with-seg)')
        if 'modality' in self.image_names:
            raise DatasetOutputError(f'--format {self.fmt}: the snapshot makes one modality per sample (a per-modality '
                                     f'archive); a case needs every modality at once: train on an archive made with '
                                     f'--modalities all --with-seg')
        if self.fmt == 'nnunet' and not self.label_idx:
            raise DatasetOutputError('--format nnunet: the snapshot has no seg_* label channels; nnU-Net trains on '
                                     'images with labels (train a joint snapshot: dataset_tool.py --with-seg)')
        missing = [m for m in MODALITIES if m not in self.image_names]
        if self.fmt == 'brats' and missing:
            raise DatasetOutputError(f'--format brats: the snapshot makes {", ".join(self.image_names) or "no images"} '
                                     f'but a BraTS case needs {", ".join(MODALITIES)} (missing {", ".join(missing)}); '
                                     f'use --format nnunet for other channel sets')
        if not self.image_idx:
            raise DatasetOutputError(f'--format {self.fmt}: the snapshot makes label channels only')

    # -- the writer protocol ------------------------------------------------------------------------------------

    @property
    def file_ending(self):
        return '.nii.gz' if self.volumes or self.fmt == 'brats' else '.png'

    def item_name(self, seed, class_index, class_name):
        return sample_case_id(seed, class_index)

    def sidecar_path(self, case):
        if self.fmt == 'brats':
            return os.path.join(self.outdir, case, f'{case}-generation.json')
        return os.path.join(self.outdir, SIDECAR_DIR, f'{case}.json')

    def dropped_path(self, case):
        return os.path.join(self.outdir, SIDECAR_DIR, f'{case}.dropped.json')

    def done(self, case) -> bool:
        """A case is finished when its sidecar (or the record of its drop by the privacy gate) exists."""
        return os.path.isfile(self.sidecar_path(case)) or os.path.isfile(self.dropped_path(case))

    def start(self, first):
        """Checks the first sample against the snapshot's kind and channels before anything is written."""
        want = 4 if self.volumes else 3
        if first.ndim != want:
            raise DatasetOutputError(f'the generator made samples of shape {tuple(first.shape)}, not '
                                     f'{"volumes (C, D, H, W)" if self.volumes else "images (C, H, W)"}')
        if first.shape[0] != len(self.channels):
            raise DatasetOutputError(f'the generator makes {first.shape[0]} channels but the snapshot names '
                                     f'{len(self.channels)}')
        if self.volumes:
            from mri.output.volumes import resolve_space
            self.space = resolve_space(self.desc, first.shape[1:], warn=self.verbose)
            if self.native_grid and not self.space.get('native'):
                raise DatasetOutputError('--native-grid: the snapshot\'s archive records no native grid (convert it '
                                         'again with this version of dataset_tool.py, --kind volumes)')
        elif self.native_grid:
            raise DatasetOutputError('--native-grid: the snapshot makes 2D slices; there is no BraTS grid to map them onto')

    def write(self, sample, case, class_name, class_values, record=None):
        """Writes one case; the sidecar (`record` plus the files) last. Returns the paths written."""
        images = [_unit(sample[i]) for i in self.image_idx]
        labels = (onehot_to_labelmap(sample[self.label_idx], threshold=0).astype(np.uint8)
                  if self.label_idx else None)
        files = self._write_arrays(case, images, labels)
        entry = dict(record or {}, case=case, files=[os.path.relpath(f, self.outdir) for f in files])
        write_json(self.sidecar_path(case), entry)
        return files + [self.sidecar_path(case)]

    def clear_partial(self):
        """Removes what a killed export left half-written: the temporary files of atomic writes (`.tmp-*`) and
        hidden partial case folders. Called by rank 0 on a dataset folder that is ours, before any rank writes."""
        folders = [self.outdir] + [os.path.join(self.outdir, d) for d in ('imagesTr', 'labelsTr', SIDECAR_DIR)]
        if self.fmt == 'brats' and os.path.isdir(self.outdir):
            folders += [os.path.join(self.outdir, d) for d in os.listdir(self.outdir) if d.startswith('BraTS-')]
        for folder in folders:
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name.startswith('.tmp-') and os.path.isfile(path):
                    os.remove(path)
                elif name.startswith('.BraTS-') and '.partial-' in name and os.path.isdir(path):
                    shutil.rmtree(path)

    def drop(self, case, record):
        """Records a sample the privacy gate kept out (no case is written)."""
        os.makedirs(os.path.join(self.outdir, SIDECAR_DIR), exist_ok=True)
        write_json(self.dropped_path(case), dict(record, case=case))

    def finish(self, classes, names=()):
        """Rank 0, after every rank: nnU-Net's dataset.json over the finished cases; returns the paths written."""
        if self.fmt != 'nnunet':
            return []
        cases = self.finished_cases(names)
        path = os.path.join(self.outdir, 'dataset.json')
        write_json(path, nnunet_dataset_json(self.image_names, self.label_names, len(cases), self.file_ending,
                                             self.regions, name='BraTS-SYN',
                                             description='generated by generate.py (manifest.json); docs/cohorts.md'))
        return [path]

    def finished_cases(self, names):
        """The sidecar entries of the cases in `names` that were written (not dropped), in that order."""
        out = []
        for case in names:
            if os.path.isfile(self.sidecar_path(case)):
                with open(self.sidecar_path(case)) as f:
                    out.append(json.load(f))
        return out

    def dropped_cases(self, names):
        out = []
        for case in names:
            if os.path.isfile(self.dropped_path(case)):
                with open(self.dropped_path(case)) as f:
                    out.append(json.load(f))
        return out

    # -- layouts ------------------------------------------------------------------------------------------------

    def _write_arrays(self, case, images, labels):
        if self.fmt == 'brats':
            return self._write_brats(case, images, labels)
        os.makedirs(os.path.join(self.outdir, 'imagesTr'), exist_ok=True)
        os.makedirs(os.path.join(self.outdir, 'labelsTr'), exist_ok=True)
        os.makedirs(os.path.join(self.outdir, SIDECAR_DIR), exist_ok=True)
        paths = [os.path.join(self.outdir, 'imagesTr', f'{case}_{k:04d}{self.file_ending}') for k in range(len(images))]
        label_path = os.path.join(self.outdir, 'labelsTr', f'{case}{self.file_ending}')
        for image, path in zip(images, paths):
            self._save(image, path, label=False)
        self._save(labels, label_path, label=True)
        return paths + [label_path]

    def _write_brats(self, case, images, labels):
        final = os.path.join(self.outdir, case)
        if os.path.isdir(final):  # a killed run's folder without its sidecar: ours (hidden rename), replace it
            shutil.rmtree(final)
        tmp = os.path.join(self.outdir, f'.{case}.partial-{os.getpid()}')
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            names = [f'{case}-{m}.nii.gz' for m in self.image_names]
            for image, name in zip(images, names):
                self._save(image, os.path.join(tmp, name), label=False)
            if labels is not None:
                names.append(f'{case}-seg.nii.gz')
                self._save(labels, os.path.join(tmp, names[-1]), label=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return [os.path.join(final, n) for n in names]

    def _save(self, array, path, label):
        if path.endswith('.png'):
            return _save_png(array if label else np.rint(array * 65535), path, 8 if label else 16)
        if not self.volumes:  # a 2D slice as a NIfTI with a singleton third axis (BraTS layout of 2D samples)
            return save_volume_nifti(path, array[:, :, None], np.eye(4))
        affine = np.asarray(self.space['affine'])
        if self.native_grid:
            from mri import volume_space
            array, affine = volume_space.to_native(array, self.space['native'], labels=label)
        return save_volume_nifti(path, array.astype(np.uint8) if label else array.astype(np.float32), affine)

    # -- real cases ---------------------------------------------------------------------------------------------

    def add_real_case(self, case_files) -> dict:
        """Converts one real BraTS case (mri.sources.brats.CaseFiles) into the dataset under its own id: the image
        files copied as they are (gzipped when they were not), the labels as BraTS 2023 values 0-3 on the case's
        own header. Returns its sidecar entry (written last)."""
        import nibabel as nib
        from mri.sources.brats import labels_to_canonical
        if not self.volumes:
            raise DatasetOutputError('--with-real: the snapshot makes 2D slices; real cases join volume datasets only')
        if case_files.seg is None:
            raise DatasetOutputError(f'--with-real: {case_files.case_id} has no label map (a training case needs one)')
        missing = [m for m in self.image_names if m not in case_files.files]
        if missing:
            raise DatasetOutputError(f'--with-real: {case_files.case_id} has no {", ".join(missing)}')
        case = case_files.case_id
        if self.fmt == 'brats':
            targets = [os.path.join(f'.{case}.partial-{os.getpid()}', f'{case}-{m}.nii.gz') for m in self.image_names]
            seg_target = os.path.join(f'.{case}.partial-{os.getpid()}', f'{case}-seg.nii.gz')
        else:
            targets = [os.path.join('imagesTr', f'{case}_{k:04d}.nii.gz') for k in range(len(self.image_names))]
            seg_target = os.path.join('labelsTr', f'{case}.nii.gz')
            for sub in ('imagesTr', 'labelsTr', SIDECAR_DIR):
                os.makedirs(os.path.join(self.outdir, sub), exist_ok=True)
        if self.fmt == 'brats':
            shutil.rmtree(os.path.join(self.outdir, case), ignore_errors=True)
            os.makedirs(os.path.join(self.outdir, os.path.dirname(targets[0])), exist_ok=True)
        for m, target in zip(self.image_names, targets):
            _copy_nifti(str(case_files.files[m]), os.path.join(self.outdir, target))
        seg_img = nib.load(str(case_files.seg))
        seg = labels_to_canonical(np.asanyarray(seg_img.dataobj), case_files.naming, case_files.seg, case)
        header = seg_img.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        with dnnlib.atomic_output(os.path.join(self.outdir, seg_target), suffix='.nii.gz') as tmp:
            nib.save(nib.Nifti1Image(seg, None, header), tmp)
        files = targets + [seg_target]
        if self.fmt == 'brats':
            os.replace(os.path.join(self.outdir, os.path.dirname(targets[0])), os.path.join(self.outdir, case))
            files = [os.path.join(case, os.path.basename(f)) for f in files]
        entry = {'case': case, 'real': True, 'source_files': {m: str(case_files.files[m]) for m in self.image_names},
                 'source_seg': str(case_files.seg), 'files': files}
        write_json(self.sidecar_path(case), entry)
        return entry


def barrier():
    """Waits for every process of a torchrun job (a no-op in a single process)."""
    import torch
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _copy_nifti(src, dst):
    """A real scan into the dataset: its bytes when it is gzipped NIfTI already, else re-saved gzipped."""
    with dnnlib.atomic_output(dst, suffix='.nii.gz') as tmp:
        if src.lower().endswith('.nii.gz'):
            shutil.copyfile(src, tmp)
        else:
            import nibabel as nib
            img = nib.load(src)  # the stored values and the header's scaling, as they were
            nib.save(nib.Nifti1Image(img.dataobj.get_unscaled(), None, img.header.copy()), tmp)


def find_real_cases(path, writer) -> list:
    """The real BraTS cases of --with-real (mri.sources.brats), checked before anything is written."""
    from mri.sources import brats
    if not writer.volumes:
        raise DatasetOutputError('--with-real: the snapshot makes 2D slices; real cases join volume datasets only')
    try:
        found = brats.discover_cases(path)
    except brats.BratsError as err:
        raise DatasetOutputError(f'--with-real: {err}') from None
    if not found:
        raise DatasetOutputError(f'--with-real {path}: holds no BraTS cases')
    for cf in found:
        missing = [m for m in writer.image_names if m not in cf.files] + ([] if cf.seg is not None else ['seg'])
        if missing:
            raise DatasetOutputError(f'--with-real: {cf.case_id} has no {", ".join(missing)} (a training case needs '
                                     f'the snapshot\'s modalities and a label map)')
    return found


# ---------------------------------------------------------------------------------------------------------------
# Painted cases (generate.py --insert-into ... --format brats|nnunet)


def _link_or_copy(src, dst):
    """`dst` as a hard link of `src` (no second copy on disk), else a copy; atomic either way."""
    with dnnlib.atomic_output(dst, suffix='.nii.gz') as tmp:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def painted_to_nnunet(writer, cases_dir, case_ids) -> list:
    """Painted BraTS case folders (mri.output.cases) into the nnU-Net layout: images and labels hard-linked into
    imagesTr / labelsTr, the painting sidecar as provenance/<case>.json (written last). Returns the cases added."""
    from mri.output.cases import case_done, sidecar_path
    added = []
    for case in case_ids:
        if writer.done(case) or not case_done(cases_dir, case):
            continue
        folder = os.path.join(cases_dir, case)
        for sub in ('imagesTr', 'labelsTr', SIDECAR_DIR):
            os.makedirs(os.path.join(writer.outdir, sub), exist_ok=True)
        for k, m in enumerate(writer.image_names):
            _link_or_copy(os.path.join(folder, f'{case}-{m}.nii.gz'),
                          os.path.join(writer.outdir, 'imagesTr', f'{case}_{k:04d}.nii.gz'))
        _link_or_copy(os.path.join(folder, f'{case}-seg.nii.gz'), os.path.join(writer.outdir, 'labelsTr', f'{case}.nii.gz'))
        with open(sidecar_path(folder, case)) as f:
            entry = json.load(f)
        write_json(writer.sidecar_path(case), entry)
        added.append(case)
    return added


def painted_entries(cases_dir, case_ids) -> list:
    """The painting sidecars (mri.output.cases) of the finished cases among `case_ids`, in that order."""
    from mri.output.cases import case_done, sidecar_path
    out = []
    for case in case_ids:
        if case_done(cases_dir, case):
            with open(sidecar_path(os.path.join(cases_dir, case), case)) as f:
                out.append(json.load(f))
    return out


def export_painted(network, cases, outdir, labels_from, opts, class_spec, device, noise_mode, truncation_psi, fmt,
                   with_real=None, trunc_center='class', rank=0, world_size=1, verbose=True) -> dict:
    """generate.py --insert-into ... --format brats|nnunet: the painting job (mri.painting.run.paint_cases, its case
    folders and resume) inside a dataset with a manifest; for nnunet the case folders go to `cases/` and the nnU-Net
    layout beside them links their files. Every check runs before anything is written. Returns the manifest."""
    import dataclasses
    from mri.output import manifest as mf
    from mri.output.cases import synthetic_case_id
    from mri.painting.run import PaintJobError, find_cases, paint_cases
    snap = mf.snapshot_record(network)
    options = dict(mode=opts.mode, paint=dict(dataclasses.asdict(opts), seeds=list(opts.seeds), scale=list(opts.scale)),
                   cases=os.path.abspath(str(cases)), labels_from=os.path.abspath(labels_from) if labels_from else None,
                   class_spec=class_spec, truncation_psi=float(truncation_psi), trunc_center=trunc_center,
                   noise_mode=noise_mode, fmt=fmt, with_real=os.path.abspath(with_real) if with_real else None,
                   device=str(device) if device else None)
    old = mf.check_outdir(outdir, fmt, snap['sha256'])
    if old is not None and not mf.same_options(old['options'], options):
        key = next(k for k in options if old['options'].get(k) != options[k])
        raise mf.ManifestError(f'--outdir {outdir}: holds a dataset started with other options ({key}); choose '
                               f'another --outdir')
    writer = DatasetWriter({'channels': list(MODALITIES) + list(SEG_CHANNELS), 'kind': 'volumes'}, outdir, fmt)
    real = find_real_cases(with_real, writer) if with_real else []
    source_cases = find_cases(cases)
    case_ids = [synthetic_case_id(n, seed) for n in range(len(source_cases)) for seed in opts.seeds]
    created = not os.path.isdir(outdir)
    if rank == 0:
        writer.clear_partial()
        os.makedirs(outdir, exist_ok=True)
        mf.write_json(os.path.join(outdir, mf.MANIFEST), mf.new_manifest(fmt, snap, options))
    barrier()
    cases_dir = outdir if fmt == 'brats' else os.path.join(outdir, 'cases')
    try:
        paint_cases(network, cases, cases_dir, labels_from, opts, class_spec, device, noise_mode, truncation_psi,
                    verbose=verbose, rank=rank, world_size=world_size)
    except PaintJobError:  # bad painting input is found before a case is written: leave no dataset behind
        if created and rank == 0 and os.listdir(outdir) == [mf.MANIFEST]:
            shutil.rmtree(outdir)
        raise
    for cf in real[rank::world_size]:
        if not writer.done(cf.case_id):
            writer.add_real_case(cf)
    barrier()
    manifest = None
    if rank == 0:
        if fmt == 'nnunet':
            painted_to_nnunet(writer, cases_dir, case_ids)
            writer.finish(None, case_ids + [cf.case_id for cf in real])
        manifest = mf.new_manifest(fmt, snap, options)
        manifest.update(status='complete', cases=painted_entries(cases_dir, case_ids) +
                        writer.finished_cases([cf.case_id for cf in real]))
        mf.write_json(os.path.join(outdir, mf.MANIFEST), manifest)
    return manifest
