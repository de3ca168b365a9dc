#!/usr/bin/env bash
# The main job on the built-in phantom source (no download): phantom BraTS cases -> three-plane slice
# archive -> a short conditional training -> images per plane, then the same path in 3D, then tumour painting
# (a patch archive, a short paint training, tumours painted into and healed out of a held-out phantom case; about
# 1 min 7 s of the whole on the dev machine with two benchmarks running beside it). Measured on the
# 2-core dev machine: 4 min 19 s end to end (2D training 27-33 s/kimg) while the test suite ran beside it;
# 64 min when other jobs kept its load average at 15-21 (docs/benchmarks.md). After these 6 kimg the images are not brains yet: per plane, dark squares with a
# brighter ring or oval and blotchy texture inside, roughly where the head is; images/all/class_grid.png has a
# row per plane, named on the left. Train longer (on a GPU) for anatomy.
# Pass an output folder as the first argument (default: quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
# One compute thread per process unless you set OMP_NUM_THREADS: the networks here are tiny (32x32, batch 8), so
# extra threads mostly wait on each other, and with DataLoader workers beside the trainer they oversubscribe the
# cores. On the 2-core dev machine with other jobs running, 1 kimg took 370 s with one thread, while a run with
# two threads had not finished half a kimg after 17 minutes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${1:-quickstart}"
python3 -m pip install -q -r requirements.txt
mkdir -p "$out"
python3 dataset_tool.py --source phantom --phantom-cases 6 --seed 0 --kind slices --resolution 32 \
    --planes axial,coronal,sagittal --split val=0.25 --dest "$out/phantom-slices.zip"
python3 train.py --outdir "$out/runs" --data "$out/phantom-slices.zip" --cond=1 --aug=ada --mirror=1 \
    --cbase 1024 --cmax 64 --map-depth 2 --batch 8 --kimg 6 --tick 1 --snap 3 --metrics none
run=$(ls -d "$out"/runs/*/ | sort | tail -n 1)
for plane in axial coronal sagittal; do
    python3 generate.py --network "$run" --seeds 0-3 --class "$plane" --outdir "$out/images/$plane"
done
python3 generate.py --network "$run" --seeds 0-5 --class all --outdir "$out/images/all"
echo "Done: run dir $run, images in $out/images (class_grid.png has one row per plane)."

# 3D (docs/volumes.md): a tiny phantom volume archive (16^3 cubes, four modalities + tumour labels, the cohort from
# the case ids), about a minute of 3D training on the CPU, then NIfTI files with the archive's affine and a
# three-plane montage per seed. At 16^3 the volumes show the path, not anatomy: train at 64^3 or 128^3 on a GPU.
python3 dataset_tool.py --source phantom --phantom-cases 4 --seed 0 --kind volumes --volume-size 16 \
    --modalities all --with-seg --labels cohort --dest "$out/phantom-vol16.zip"
python3 train.py --outdir "$out/runs3d" --data "$out/phantom-vol16.zip" --cond=1 --aug=ada \
    --cbase 256 --cmax 32 --map-depth 2 --batch 4 --kimg 0.04 --tick 0.02 --snap 1 --metrics none
run3d=$(ls -d "$out"/runs3d/*/ | sort | tail -n 1)
python3 generate.py --network "$run3d" --seeds 0-1 --class pht --outdir "$out/volumes"
echo "Done (3D): run dir $run3d; NIfTI and montages in $out/volumes (open seed0000-t2f.nii.gz with seed0000-seg.nii.gz in 3D Slicer or ITK-SNAP)."

# Tumour painting (docs/painting.md): phantom case folders at 2 mm, 32x32 axial patches around tumours and in
# healthy tissue, a short training of the painting family (the patch archive picks it; paint_ssim at each snapshot),
# then two new tumours painted into a case it did not train on, and that case's tumour healed. After 0.2 kimg the
# painted regions are smooth blobs; the point is the path: BraTS-SYN-* folders on the source's grid, a montage each.
python3 -m mri.sources.phantom --outdir "$out/phantom-cases" --cases 4 --seed 0 --shape 120,120,78 --spacing 2
python3 -m mri.sources.phantom --outdir "$out/phantom-heldout" --cases 1 --seed 10 --shape 120,120,78 --spacing 2
python3 dataset_tool.py --source "$out/phantom-cases" --kind patches --patch-size 32,32 --planes axial \
    --patches-per-case 8 --dest "$out/phantom-patches32.zip"
python3 train.py --outdir "$out/runs-paint" --data "$out/phantom-patches32.zip" --aug=ada \
    --cbase 1024 --cmax 64 --map-depth 2 --batch 8 --kimg 0.2 --tick 0.1 --snap 1
runpaint=$(ls -d "$out"/runs-paint/*/ | sort | tail -n 1)
python3 generate.py --network "$runpaint" --insert-into "$out/phantom-heldout" --per-case 2 \
    --labels-from "$out/phantom-cases" --scale 0.4,0.7 --outdir "$out/painted"
python3 generate.py --network "$runpaint" --insert-into "$out/phantom-heldout" --heal --outdir "$out/healed"
echo "Done (painting): run dir $runpaint; new cases in $out/painted and $out/healed (BraTS-SYN-*-montage.png: source, result, new labels)."
