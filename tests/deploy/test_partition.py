"""A host cut off mid-run is survived: the watchdog aborts, the supervisor kills what MPI_Abort
cannot end, restarts from the newest checkpoint once the host is back, and the run completes.
Two network-namespace hosts, ranks talking TCP only, started by `distmulti launch --hostfile`."""
import json
import sys

import pytest

from tests.deploy import netns
from tests.deploy.test_multihost import MPI_ARGS, NET, QUICK, Job, job_env, training_ranks
from tests.deploy.test_multihost import multihost_ready  # noqa: F401  (fixture)

pytestmark = pytest.mark.deploy


def test_a_host_cut_off_mid_run_is_survived_by_watchdog_and_supervisor(multihost_ready,  # noqa: F811
                                                                       tmp_path):
    mpi_args = MPI_ARGS + ['--mca', 'btl_tcp_if_include', NET, '--prtemca',
                           'oob_tcp_if_include', NET]
    with netns.network_hosts(2) as cluster:
        hostfile = cluster.write_hostfile(str(tmp_path / 'hosts'))
        out = tmp_path / 'out'
        argv = ([sys.executable, '-m', 'distmulti', 'launch', '-n', '2', '--hostfile', hostfile,
                 '--max-restarts', '1', '--restart-delay', '10'] + [f'--mpi-arg={a}' for a in mpi_args]
                + ['--', *QUICK, '--iterations', '1500', '--checkpoint-interval', '100',
                   '--hang-timeout', '5', '--out', str(out)])
        job = Job(cluster, 'h1', argv, str(tmp_path / 'job.log'), job_env())
        job.wait_until(lambda: (out / 'checkpoint_iter_100.json').exists()
                       and training_ranks(cluster, 'h2'), 120, 'a checkpoint on both hosts')
        cluster.cut_link('h2')
        job.wait_until(lambda: 'job failed:' in job.output(), 120,
                       'the supervisor noticing the lost host')
        cluster.restore_link('h2')  # the host is back before the restart, 10 s later
        code = job.wait(300, what='the restarted job')
        output = job.output()
    assert code == 0, output[-4000:]
    # Rank 0, on the host still reachable, stops hearing rank 1 and ends the job.
    assert 'rank 1 sent no heartbeat for' in output, output[-4000:]
    assert 'it is stopped, dead or cut off; the hang watchdog (5 s) is ending the job' in output
    assert 'restart 1/1 from the newest checkpoint' in output and ' in 10 s' in output
    assert 'same number of ranks (2)' in output
    result = json.loads((out / 'result.json').read_text())
    assert result['iterations'] == 1500 and result['world_size'] == 2
