"""What a serving system is measured on: datasets, arrival processes, SLO targets and the goodput
search. The library's own (the placement search and the simulator use them); ``bench`` drives them
against servers."""
