#!/bin/bash
# A compression run in a memory-limited control group (cgroup v1 memory controller; needs root), as in
# docs/RESULTS.md "A model larger than the memory":
#   benchmarks/cgroup_demo.sh OUT [LIMIT_MB=2500] [SRC]
# runs `fusegpt compress smollm2-135m --remove 2 --threads 2 --out OUT` under /usr/bin/time -v in a child group of
# this shell's memory cgroup limited to LIMIT_MB; SRC: a source tree to run instead of the installed package (e.g.
# `git worktree add /tmp/old 42581fe` and SRC=/tmp/old/src for the code before the streaming decision).
set -u
out=$1; limit=${2:-2500}; src=${3:-}
rel=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
d=/sys/fs/cgroup/memory${rel}/fusegpt-demo-$$
mkdir "$d" || { echo "cannot create $d (cgroup v1 memory controller and root needed)"; exit 2; }
trap 'rmdir "$d"' EXIT
echo $((limit * 1024 * 1024)) > "$d/memory.limit_in_bytes"
cd "$(dirname "$0")/.."
[ -n "$src" ] && export PYTHONPATH=$src
sh -c "echo \$\$ > $d/cgroup.procs && exec /usr/bin/time -v .venv/bin/fusegpt compress smollm2-135m --remove 2 \
  --threads 2 --out $out" > "$out.log" 2>&1
rc=$?
echo "rc=$rc; the group's largest usage $(cat "$d/memory.max_usage_in_bytes") bytes, limit hits $(cat "$d/memory.failcnt")"
grep -a "Maximum resident\|Elapsed\|terminated" "$out.log"
exit $rc
