# Shared by the sbatch launchers beside this file (sourced, not run). Every setting below comes
# from the environment (`VAR=... sbatch ...` or `sbatch --export=ALL,VAR=...`); the arguments of
# the sbatch script itself are Hydra overrides for glm-pretrain.
#
#   RUN_DIR          run directory: checkpoints, TensorBoard, log.txt, logs/ (default outputs/runs/<experiment>)
#   EXPERIMENT       configs/experiment member (each launcher sets its own; smoke.sbatch lets you change it)
#   TASKS_PER_NODE   processes per node, one per GPU (default: the job's --ntasks-per-node, else its
#                    --gpus-per-node, else 1; the headers leave --ntasks-per-node out: with it Slurm
#                    gives a node range its minimum)
#   CONTAINER_IMAGE  pyxis/enroot image: srun runs inside it (the job's plain environment when unset)
#   CONTAINER_MOUNTS pyxis --container-mounts, e.g. /lustre:/lustre (default: the repository and RUN_DIR)
#   PYTHON           interpreter inside the job (default: the repository's .venv/bin/python, which
#                    `make smoke` / `make test` set up, when it exists and no CONTAINER_IMAGE is given;
#                    else python3)
#   MAX_FAILURES     requeues after a failed run (an error, a hang or a dead rank: exit 76) without a new
#                    checkpoint in between before giving up (default 2); a preemption, a time limit or a
#                    stage with its own layout (exit 75 after a checkpoint) always requeues; a bad config
#                    (2), an unstable run (3) or a failed save (4) never does
#   WAIT_S           seconds the other ranks get after the first one exits (default 120)
#   DRY_RUN=1        print the srun command line, the master address, the environment and the resolved
#                    config, launch nothing (outside a job: the header's node count, the top of a range)
#
# A node range (sbatch --nodes=MIN-MAX) starts on as many idle nodes as the range allows, and so does
# every requeue: after a node is lost the job comes back on the nodes left, and grows again at a later
# requeue once nodes return. Each (re)start uses the most of its nodes that the run's layouts and global
# batch fit (`glm-pretrain --fit-nodes`), gives the others back to Slurm, and the run resumes there with
# another data-parallel size.
#
# The run itself: glm-pretrain saves and exits 75 on SIGUSR1/SIGTERM (the header's --signal asks
# Slurm for USR1 before the time limit) and where a stage switches to another parallel layout
# (stages.<name>.parallel), and resumes from RUN_DIR's `latest` when started again, under the layout
# of the stage it is in.

GLM_REPO=${GLM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
EXIT_RESUME=75

# What Megatron-Core and NCCL need, in one place.
# - One hardware queue per device: Megatron orders tensor/sequence-parallel communication against
#   compute through the stream order, which several queues would break.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# - A rank whose collective fails or times out aborts the job instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# - Data-loader workers and CPU ops: the node's cores are shared by its tasks.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

export PYTHONPATH="$GLM_REPO${PYTHONPATH:+:$PYTHONPATH}"  # the packages, installed or not
if [[ -z ${PYTHON:-} ]]; then  # the README's set-up outside a container; the container's python3 in one
    if [[ -z ${CONTAINER_IMAGE:-} && -x $GLM_REPO/.venv/bin/python ]]; then
        PYTHON=$GLM_REPO/.venv/bin/python
    else
        PYTHON=python3
    fi
fi

_glm_header() {  # _glm_header SCRIPT OPTION DEFAULT: the value of "#SBATCH --OPTION=VALUE" in SCRIPT
    local value
    value=$(sed -n "s/^#SBATCH --$2=\([^ ]*\).*/\1/p" "$1" 2>/dev/null | head -1)
    echo "${value:-$3}"
}

_glm_count() {  # "8", "h100:8", "8(x2)" -> 8; "2-3" -> 3 (a range: its top)
    local v=${1%%(*}
    v=${v##*:}
    echo "${v##*-}"
}

_glm_free_port() {  # a port free on this node (the job's first: rank 0's), below the ephemeral range
    python3 - <<'PY'
import random, socket
try:
    high = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError):
    high = 32768
for port in random.sample(range(20000, high), 64):
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
        print(port)
        break
PY
}

glm_launch() {  # glm_launch EXPERIMENT [hydra overrides...]
    local experiment=$1
    shift
    local run_dir
    run_dir=$(realpath -m "${RUN_DIR:-outputs/runs/$experiment}")
    # inside a job: what Slurm gave it; outside (a dry run): the launcher's #SBATCH header
    local script=${BASH_SOURCE[1]:-}
    local nodes per_node
    nodes=$(_glm_count "${SLURM_JOB_NUM_NODES:-$(_glm_header "$script" nodes 1)}")
    per_node=${TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_PER_NODE:-$(_glm_header "$script" ntasks-per-node \
        "$(_glm_header "$script" gpus-per-node 1)")}}}
    per_node=$(_glm_count "$per_node")
    local restart=${SLURM_RESTART_COUNT:-0}
    local logs="$run_dir/logs/job-${SLURM_JOB_ID:-dry}-restart-$restart"
    local hosts=()  # the job's nodes, in order; the first runs this script and rank 0
    if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
        mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null)
    fi
    local master=${hosts[0]:-}
    if [[ -z $master && -n ${SLURM_JOB_NODELIST:-} ]]; then  # (a dry run outside Slurm: no scontrol)
        master=$(cd "$GLM_REPO" && "${PYTHON:-python3}" -c 'import sys; from pretrain.parallel import first_host
print(first_host(sys.argv[1]))' "$SLURM_JOB_NODELIST")
    fi

    # as many of the job's nodes as the run fits: every stage's layout, and the global batch in
    # micro-batch x data-parallel sequences (a node range may have given a count that does not)
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        local fit asked
        fit=$(cd "$GLM_REPO" && WORLD_SIZE="" "${PYTHON:-python3}" -m pretrain "experiment=$experiment" \
              "run.dir=$run_dir" "$@" --fit-nodes "$nodes" "$per_node")
        asked=$?
        if (( asked == 2 )); then
            echo "none of 1..$nodes node(s) x $per_node task(s) can run it (above): not started; submit with a" \
                 "node count that works (exit 2)" >&2
            return 2
        elif (( asked != 0 )) || [[ ! $fit =~ ^[0-9]+$ ]]; then  # e.g. a container's packages, absent out here
            echo "could not ask \`glm-pretrain --fit-nodes\` on this node (exit $asked; PYTHON=${PYTHON:-python3}):" \
                 "using all $nodes node(s); the run checks its world size itself" >&2
            fit=$nodes
        fi
        if (( fit < nodes )); then
            # give the rest back to Slurm (a later requeue asks for the job's whole range again);
            # scontrol writes the job's new variables into slurm_job_<id>_resize.sh where it runs
            mkdir -p "$logs"
            if [[ -n ${SLURM_JOB_ID:-} ]] && (cd "$logs" && scontrol update JobId="$SLURM_JOB_ID" NumNodes="$fit") \
                    >/dev/null 2>&1 && [[ -f $logs/slurm_job_${SLURM_JOB_ID}_resize.sh ]]; then
                source "$logs/slurm_job_${SLURM_JOB_ID}_resize.sh"
                echo "using $fit of the job's $nodes nodes, gave ${hosts[*]:$fit} back to Slurm: the run's layouts" \
                     "and global batch do not fit $nodes"
            else
                echo "using $fit of the job's $nodes nodes, ${hosts[*]:$fit} stay idle: the run's layouts and global" \
                     "batch do not fit $nodes"
            fi
            nodes=$fit
        fi
    fi
    local cmd=(srun --nodes="$nodes" --ntasks-per-node="$per_node")
    if (( ${#hosts[@]} > nodes )); then
        cmd+=(--nodelist="$(IFS=,; echo "${hosts[*]:0:$nodes}")")
    fi
    # Every rank exits by itself when the run ends or stops early (75, with a checkpoint), within
    # seconds of each other; --kill-on-bad-exit would take exit 75 for a failure and kill the ranks
    # still closing down. A rank that dies leaves the others in a collective: they are ended
    # WAIT_S seconds after the first task exits (NCCL's own timeout is longer).
    cmd+=(--kill-on-bad-exit=0 --wait="${WAIT_S:-120}" --output="$logs/task-%t.log")
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        cmd+=(--container-image="$CONTAINER_IMAGE"
              --container-mounts="${CONTAINER_MOUNTS:-$GLM_REPO:$GLM_REPO,$(dirname "$(realpath -m "$run_dir")"):$(dirname "$(realpath -m "$run_dir")")}"
              --container-workdir="$GLM_REPO")
    fi
    cmd+=("${PYTHON:-python3}" -m pretrain "experiment=$experiment" "run.dir=$run_dir" "$@")

    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "# srun command line ($nodes node(s) x $per_node task(s)):"
        printf '%q ' "${cmd[@]}"
        echo
        echo "# master address: ${master:-the first node of the job} (rank 0's node; each task derives it from" \
             "SLURM_STEP_NODELIST), port: picked free there at each (re)start"
        echo "# environment:"
        env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_ASYNC_ERROR_HANDLING|NCCL_DEBUG|OMP_NUM_THREADS|CONTAINER_IMAGE|CONTAINER_MOUNTS)=' | sort
        echo "# resolved config (glm-pretrain --print-config, world size $((nodes * per_node))):"
        (cd "$GLM_REPO" && WORLD_SIZE=$((nodes * per_node)) "${PYTHON:-python3}" -m pretrain \
            "experiment=$experiment" "run.dir=$run_dir" "$@" --print-config) || return $?
        echo "# node counts that run it:"
        (cd "$GLM_REPO" && "${PYTHON:-python3}" -m pretrain "experiment=$experiment" "run.dir=$run_dir" "$@" \
            --fit-nodes "$nodes" "$per_node" 2>&1 >/dev/null | sed 's/^glm-pretrain: //')
        return 0
    fi

    # Each task's rank comes from Slurm (SLURM_PROCID ...): whatever a launching shell had set (a
    # torchrun, an interactive session) must not reach the tasks. The rendezvous is the job's first
    # node (where this script runs) on a port free there, picked again at every (re)start.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR
    export MASTER_PORT
    MASTER_PORT=$(_glm_free_port)
    mkdir -p "$logs"
    echo "job ${SLURM_JOB_ID:-?} (restart $restart) on $nodes node(s) x $per_node task(s)" \
         "(${hosts[*]:0:$nodes}; master ${master:-?}:$MASTER_PORT); logs in $logs"
    # in the background, so that this shell can still run its traps while the step runs
    "${cmd[@]}" &
    wait $!
    local code=$?
    glm_after_run "$code" "$run_dir"
}

glm_after_run() {  # what the job does once its run ended: finish, requeue, or give up
    local code=$1 run_dir=$2
    local failures_file="$run_dir/logs/failures"
    if [[ $code == 0 ]]; then
        echo "run finished (exit 0)"
        return 0
    fi
    if [[ $code == "$EXIT_RESUME" ]]; then
        echo "run stopped early with a checkpoint (exit $EXIT_RESUME): requeueing job $SLURM_JOB_ID to resume"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    case $code in  # the stops that a restart would only meet again: a person must look (README: Faults)
        2) echo "bad config or data, or no checkpoint that loads (exit 2): not requeued; see the log above" >&2
           return 2 ;;
        3) echo "training is unstable (exit 3: too many loss spikes or non-finite steps): not requeued;" \
                "the log names the steps, $run_dir/skipped_batches.json the batches left out" >&2
           return 3 ;;
        4) echo "a checkpoint could not be written (exit 4: a full disk, an I/O error): not requeued;" \
                "\`latest\` still names the last good one; free space and submit again" >&2
           return 4 ;;
        76) echo "the watchdog ended the run (exit 76): a rank hung or died; $run_dir/log.txt names it," \
                 "$run_dir/watchdog/ holds every rank's stacks" >&2 ;;
    esac
    # failures in a row without a new checkpoint in between: a run that keeps failing at the same
    # place stops; one that fails now and then but moves on does not
    local latest failures=1 seen="" count=0
    latest=$(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo none)
    [[ -f $failures_file ]] && read -r count seen < "$failures_file"
    [[ $seen == "$latest" ]] && failures=$(( ${count:-0} + 1 ))
    echo "$failures $latest" > "$failures_file"
    if (( failures > ${MAX_FAILURES:-2} )); then
        echo "run failed (exit $code) $failures times in a row at checkpoint $latest: giving up" \
             "(MAX_FAILURES=${MAX_FAILURES:-2}; the count is in $failures_file)" >&2
        return "$code"
    fi
    echo "run failed (exit $code), $failures time(s) in a row at checkpoint $latest (at most" \
         "MAX_FAILURES=${MAX_FAILURES:-2} requeues): requeueing job $SLURM_JOB_ID to resume from it" >&2
    scontrol requeue "$SLURM_JOB_ID"
    return 0
}
