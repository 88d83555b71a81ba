// Renders the math that pymdownx.arithmatex (generic mode) leaves as \( … \) and \[ … \]
// with the KaTeX vendored beside this file: no network access at view time.
// document$ is mkdocs-material's page observable (it fires on instant navigation too).
(function () {
  function render(root) {
    if (typeof renderMathInElement !== "function") return;
    renderMathInElement(root, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (page) { render(page.body || document.body); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { render(document.body); });
  }
})();
