"""The contributor's policy: when this machine may compute, and how much of it.

config.py reads the policy (config.toml, IDLEGRID_AGENT_* variables, `run` flags); idle.py says how long
the user has been away; conditions.py samples the rest of the machine; governor.py turns all of it into a
verdict every quarter second and holds the compute child to it (SIGSTOP/SIGCONT, a duty cycle).
"""
