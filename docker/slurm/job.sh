#!/usr/bin/env bash
# Batch-side logic shared by docker/slurm/*.sbatch (every template `exec`s this file).
#
# It resolves the head node and rendezvous port, builds the srun (and pyxis/enroot
# container) flags, starts docker/slurm/launch_ranks.sh on every node, and handles
# pre-emption: `#SBATCH --signal=B:TERM@120` sends SIGTERM to this shell 120 s before the
# time limit (or on pre-emption); it is forwarded to srun, which forwards it to every
# rank; Keel finishes the current step, writes a checkpoint and exits; this script then
# requeues the job (`#SBATCH --requeue`), and the next start continues from that
# checkpoint (checkpoint.resume=auto).
#
# Settings (environment; the sbatch files set the first two):
#   KEEL_ALGO            algorithm: `keel train <KEEL_ALGO>`                       (required)
#   KEEL_CONFIG          YAML config, relative to KEEL_HOME; skipped when empty
#   KEEL_HOME            Keel checkout seen by the job      (default: $SLURM_SUBMIT_DIR)
#   KEEL_IMAGE           container image for pyxis/enroot, e.g. keel.sqsh or a registry
#                        image; empty = run on the host (the Python env must have Keel)
#   KEEL_MOUNTS          extra container mounts, "src:dst[,src:dst]" (data, caches)
#   KEEL_LAUNCHER        srun (one task per GPU, default) | torchrun (one per node)
#   GPUS_PER_NODE        ranks per node          (default: $SLURM_GPUS_ON_NODE, else 8)
#   KEEL_RUN_DIR         run.output_dir, relative to KEEL_HOME (default: runs/$SLURM_JOB_NAME)
#   KEEL_CHECKPOINT_DIR  checkpoint.dir, relative to KEEL_HOME (default: $KEEL_RUN_DIR/checkpoints)
#   KEEL_REQUEUE         1 = requeue after a SIGTERM checkpoint (default 1)
#   MASTER_ADDR / MASTER_PORT   rendezvous (default: first node / 20000 + job id % 20000)
# Arguments are extra `section.field=value` overrides for Keel.
set -euo pipefail

algo="${KEEL_ALGO:?set KEEL_ALGO to an algorithm of keel train (sft, rm, dpo, ppo, grpo, ...)}"
keel_home="$(cd "${KEEL_HOME:-${SLURM_SUBMIT_DIR:-${PWD}}}" && pwd)"
# Relative paths are taken from KEEL_HOME, where Keel runs (the job changes into it below).
in_home() { if [[ "$1" == /* ]]; then echo "$1"; else echo "${keel_home}/$1"; fi; }
job_id="${SLURM_JOB_ID:-0}"
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
gpus_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
launcher="${KEEL_LAUNCHER:-srun}"
run_dir="$(in_home "${KEEL_RUN_DIR:-runs/${SLURM_JOB_NAME:-keel-${algo}}}")"
checkpoint_dir="$(in_home "${KEEL_CHECKPOINT_DIR:-${run_dir}/checkpoints}")"
mkdir -p "${run_dir}" "${checkpoint_dir}"

export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + job_id % 20000))}"
export KEEL_LAUNCHER="${launcher}"
export GPUS_PER_NODE="${gpus_per_node}"

# --- NCCL / network: uncomment what your fabric needs -----------------------------------
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL's bootstrap (not lo/docker0)
# export GLOO_SOCKET_IFNAME=ib0          # same for gloo (CPU-side collectives)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3             # RoCE: the GID index of the RoCEv2 address
# export NCCL_IB_TIMEOUT=22              # long IB retries on large clusters
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA distance
# export NCCL_CROSS_NIC=1
# export NCCL_NVLS_ENABLE=0              # turn NVLink SHARP off if it misbehaves
# export NCCL_DEBUG=INFO                 # or WARN; NCCL_DEBUG_SUBSYS=INIT,NET to narrow it
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron's TP/SP overlap ordering
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if [[ "${launcher}" == torchrun ]]; then
    tasks_per_node=1
else
    tasks_per_node="${gpus_per_node}"
fi
srun_flags=(
    --nodes="${nnodes}"
    --ntasks-per-node="${tasks_per_node}"
    --ntasks="$((nnodes * tasks_per_node))"
    --kill-on-bad-exit=1
    --label
)
if [[ -n "${KEEL_IMAGE:-}" ]]; then
    mounts="${keel_home}:${keel_home}"
    if [[ "${run_dir}" != "${keel_home}"/* ]]; then
        mounts+=",${run_dir}:${run_dir}"
    fi
    if [[ "${checkpoint_dir}" != "${keel_home}"/* && "${checkpoint_dir}" != "${run_dir}"/* ]]; then
        mounts+=",${checkpoint_dir}:${checkpoint_dir}"
    fi
    if [[ -n "${KEEL_MOUNTS:-}" ]]; then
        mounts+=",${KEEL_MOUNTS}"
    fi
    srun_flags+=(
        --container-image="${KEEL_IMAGE}"
        --container-mounts="${mounts}"
        --container-workdir="${keel_home}"
        --container-name="keel-${job_id}"   # unpacked once per node, reused by every step
        --no-container-mount-home
    )
fi

keel_args=(train "${algo}")
if [[ -n "${KEEL_CONFIG:-}" ]]; then
    config="$(in_home "${KEEL_CONFIG}")"
    if [[ ! -f "${config}" ]]; then
        echo "job.sh: KEEL_CONFIG=${KEEL_CONFIG} not found (${config}: relative paths are taken from KEEL_HOME); set KEEL_CONFIG to your YAML, or KEEL_CONFIG= to pass only overrides" >&2
        exit 2
    fi
    keel_args+=(--config "${config}")
fi
keel_args+=("run.output_dir=${run_dir}" "checkpoint.dir=${checkpoint_dir}" checkpoint.resume=auto "$@")

terminated=0
srun_pid=""
# shellcheck disable=SC2329  # called by the trap below
forward_term() {
    terminated=1
    echo "keel: SIGTERM at $(date -Is): asking every rank to checkpoint and stop" >&2
    if [[ -n "${srun_pid}" ]]; then
        kill -TERM "${srun_pid}" 2>/dev/null || true
    fi
}
trap forward_term TERM

echo "keel: job ${job_id} (restart ${SLURM_RESTART_COUNT:-0}): ${nnodes} node(s) x ${gpus_per_node} GPUs," \
     "launcher ${launcher}, head ${MASTER_ADDR}:${MASTER_PORT}, run dir ${run_dir}" >&2
cd "${keel_home}"
srun "${srun_flags[@]}" bash "${keel_home}/docker/slurm/launch_ranks.sh" "${keel_args[@]}" &
srun_pid=$!
status=0
wait "${srun_pid}" || status=$?
while kill -0 "${srun_pid}" 2>/dev/null; do  # the trap interrupted `wait`: srun is still stopping
    status=0
    wait "${srun_pid}" || status=$?
done

if (( terminated )) && [[ "${KEEL_REQUEUE:-1}" == 1 ]]; then
    echo "keel: requeueing job ${job_id}; the next start resumes from ${checkpoint_dir}" >&2
    scontrol requeue "${job_id}" || echo "keel: scontrol requeue failed; resubmit to continue" >&2
fi
exit "${status}"
