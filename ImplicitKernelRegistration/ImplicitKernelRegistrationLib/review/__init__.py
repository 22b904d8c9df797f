"""Reading a registration: the quality verdict, the report, the ablative margin and its uncertainty."""
