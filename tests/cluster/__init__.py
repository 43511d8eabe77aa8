"""Test harness that runs the distributed parts for real on one machine.

- :mod:`tests.cluster.slurm`: a two-node Slurm cluster (munged, slurmctld,
  two slurmd) in a temporary folder, with sbatch/srun helpers;
- :mod:`tests.cluster.pdsh`: sshd with generated keys, DeepSpeed hostfiles for
  ``--launcher pdsh``, and two hosts in network namespaces joined by a veth;
- :mod:`tests.cluster.tensorboard`: a TensorBoard server on loopback and its
  HTTP API read back;
- :mod:`tests.cluster.daemons`: starting/stopping those processes, bounded waits;
- :mod:`tests.cluster.fixtures`: pytest fixtures around all of the above.

The facts these rely on are in ``../shared/docs/cluster-testing.md``.
"""
