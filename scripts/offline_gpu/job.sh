#!/bin/bash
# Driver for the reference study on an offline GPU host that receives make_bundle.sh chunks one transfer at a time.
# Usage, from the repository root on the host: bash scripts/offline_gpu/job.sh STEP [ARG]; steps chain with &&.
# Steps: chunk N (append chunk N from $CHUNKS; chunk 0 also snapshots the tree to /tmp/repo), smol (install whl/ +
# smol/, after chunk 2), gemma (after the last chunk), bench, gcheck, sweeps [GEMMA_LANES], sweep MODEL LANES
# OVERRIDES..., wait SECONDS, progress, pack (results into $OUT/res.tgz). Used in sessions 7-8 of the reference study
# (docs/results/README.md).
# Background work is started with setsid so it outlives the call; results live in /tmp/runs on the machine.
set -u
CHUNKS=${CHUNKS:-.gpu}
OUT=${OUT:-/tmp/out}
B=/tmp/bundle.tar
X=/tmp/b
export GRADMAP_CACHE=/tmp/gcache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONPATH=/tmp/site:/tmp/repo
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # many jobs share 16 cores; their heavy work is on the GPU
SWEEP="hydra/launcher=parallel tracker=none device=cuda runs_dir=/tmp/runs hydra.launcher.jobs_per_gpu=16"
step=$1
arg=${2:-}

install_from() {  # extract the named bundle folders, check them, pip-install them into /tmp/site
  mkdir -p $X && (cd $X && tar xf $B "$@" 2>/dev/null; true)
  (cd $X && grep -E "^[0-9a-f]+  ($(echo "$@" | tr ' ' '|'))/" /tmp/repo/.gpu-manifest | sha256sum -c --quiet) || { echo "BAD CHECKSUM $*"; return 1; }
  for d in "$@"; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $X/$d/*.whl || return 1
  done
  echo "installed $*"
}

case $step in
  chunk)  # append chunk ARG once
    if [ ! -e /tmp/got.$arg ]; then cat $CHUNKS/c$arg >> $B && touch /tmp/got.$arg; fi
    if [ "$arg" = 0 ]; then
      rm -rf /tmp/repo && mkdir /tmp/repo && tar cf - --exclude=./$CHUNKS . | tar xf - -C /tmp/repo
      cp $CHUNKS/manifest /tmp/repo/.gpu-manifest
      nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    fi
    ls -l $B | awk '{print "bundle", $5}' ;;
  smol) install_from whl smol && python3 -c "import lm_eval, hydra, transformers, gguf; print('imports ok', transformers.__version__, lm_eval.__version__)" ;;
  gemma) install_from gemma ;;
  bench)  # SmolLM2 bf16 full eval, both loops, alone on the GPU
    cd /tmp/repo && setsid nohup python3 scripts/eval_throughput.py --loops lm_eval,lean --dtypes bfloat16 \
      --batch-sizes 256 --out /tmp/bench_smol.json > /tmp/bench_smol.log 2>&1 < /dev/null &
    echo "bench started" ;;
  gcheck)  # Gemma: both loops on eval=quick, bf16, batch 4 (items compared)
    cd /tmp/repo && setsid nohup python3 scripts/eval_throughput.py --model gemma3_270m --preset quick \
      --loops lm_eval,lean --dtypes bfloat16 --batch-sizes 4 --out /tmp/bench_gemma.json > /tmp/bench_gemma.log 2>&1 < /dev/null &
    echo "gemma check started" ;;
  sweeps)  # ARG: Gemma lanes. The two reference commands of docs/results/README.md, detached
    cd /tmp/repo
    setsid nohup python3 run.py -m experiment=reference model=smollm2_135m $SWEEP hydra.launcher.n_jobs=2 \
      ${SMOL_ARGS:-seed=0 method=laco,last_n,blockpruner} > /tmp/sx.log 2>&1 < /dev/null &
    setsid nohup python3 run.py -m experiment=reference model=gemma3_270m $SWEEP hydra.launcher.n_jobs=${arg:-5} \
      eval.batch_size=32 eval.loop=lean ${GEMMA_ARGS:-seed=0} > /tmp/gx.log 2>&1 < /dev/null &
    echo "sweeps started" ;;
  sweep)  # ARG: model, then lanes, then overrides: one detached sweep of $EXPERIMENT (default reference), lean loop
    model=$arg; lanes=$3; shift 3; log=/tmp/sweep_${model}_$(date +%H%M%S).log
    cd /tmp/repo && setsid nohup python3 run.py -m experiment=${EXPERIMENT:-reference} model=$model $SWEEP hydra.launcher.n_jobs=$lanes \
      eval.loop=lean "$@" > $log 2>&1 < /dev/null &
    sleep 2  # two sweeps of one model must not share a multirun folder (its name has 1 s resolution)
    echo "sweep started: $model x$lanes $* -> $log" ;;
  wait)  # wait ARG seconds, printing progress, then pack results
    end=$((SECONDS + ${arg:-240}))
    while [ $SECONDS -lt $end ]; do sleep 30; done
    bash scripts/offline_gpu/job.sh progress; bash scripts/offline_gpu/job.sh pack ;;
  progress)
    date +%T; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    for f in /tmp/bench_smol.log /tmp/bench_gemma.log; do [ -e $f ] && { echo "== $f"; grep '^{' $f; tail -c 300 $f | tr '\r' '\n' | tail -2; }; done
    for d in /tmp/runs/*/*/; do
      [ -d "$d" ] || continue
      if [ -e "$d/result.json" ]; then
        python3 -c "import json,sys; r=json.load(open('$d/result.json')); m=r.get('metrics',{}); t=r.get('timing',{}); print(r['status'], r['job_name'], r.get('removed_layers'), round(m.get('avg',-1),2), round(m.get('wikitext2_ppl',-1),1), round(t.get('prune_s',-1)), round(t.get('eval_s',-1)), (r.get('lm_eval') or {}).get('throughput',{}).get('requests_per_s'), (r.get('error') or '')[:200])"
      else echo "running $(basename $d)"; fi
    done
    grep -h -i "error\|Traceback" /tmp/sx.log /tmp/gx.log /tmp/sweep_*.log 2>/dev/null | tail -5 ;;
  pack)  # everything small enough: finished job folders and logs
    cd /tmp && tar czf $OUT/res.tgz --exclude='*.safetensors' --exclude='*.pt' runs bench_*.json bench_*.log sx.log gx.log sweep_*.log 2>/dev/null
    ls -l $OUT ;;
esac
