# Marks includes/ as a package for cimport (declarations only: nothing here is
# compiled or installed on its own).
