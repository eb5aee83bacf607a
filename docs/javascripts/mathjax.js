// MathJax 3 (vendored: javascripts/vendor/mathjax/tex-svg.js) set up for pymdownx.arithmatex
// (generic mode): \( \) inline, \[ \] display. SVG output needs no web fonts, so every formula
// renders offline.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  svg: { fontCache: "global" },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" }
};
document$.subscribe(() => {
  if (!window.MathJax.startup || !window.MathJax.typesetPromise) return;   // not loaded yet: it typesets on load
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
