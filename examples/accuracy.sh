#!/bin/sh
# The accuracy figures of issue #13 (minutes; not part of CI). Recipe: train on MNIST t10k
# (10,000 digits), test on train-5k (5,000), Adam 1e-3, batch 64, 10 epochs, seed 0.
# Expected: CNN >= 97.3% single and >= 96.8% async (2 workers, 2 shards); LSTM >= 94.0% single.
# Usage: examples/accuracy.sh [OUT_DIR]   (metrics JSON lines land in OUT_DIR, default runs/accuracy)
set -eu
out=${1:-runs/accuracy}
mkdir -p "$out"
common="--train-split t10k --test-split train-5k --optimizer adam --lr 0.001 --batch-size 64 \
--epochs 10 --seed 0 --progress lines"
cnn="conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu"

downpour train $common --layers "$cnn" --input-shape 1,28,28 --metrics "$out/cnn-single.jsonl"
downpour train $common --layers "$cnn" --input-shape 1,28,28 --mode async --workers 2 --shards 2 \
    --metrics "$out/cnn-async.jsonl"
downpour train $common --layers lstm:128 --input-shape 28,28 --metrics "$out/lstm-single.jsonl"
