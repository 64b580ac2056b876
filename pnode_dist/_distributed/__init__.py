"""Distribution: PETSc/MPI start-up, collective errors, and how a tensor maps onto a
distributed Vec (layouts).
"""
