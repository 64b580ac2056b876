"""The solve engine: one PETSc TS per Integrator, the torch callbacks PETSc calls (guarded),
methods' tableaus, PETSc options, devices and object lifetimes.
"""
