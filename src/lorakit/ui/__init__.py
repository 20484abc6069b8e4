"""The web page of `lorakit ui`: runs with live curves, chat and side-by-side compare.

`routes` adds the page's files and its read-only runs routes to the serve app and runs
`lorakit ui`; `runs` reads the runs folder as the page shows it; `page/` holds the page itself
(index.html, ui.css, ui.js, chat.js, chart.js: plain files, no build step).

Import the module you need (`lorakit.ui.routes`, ...); this package imports nothing by itself,
so that the command line starts fast.
"""
