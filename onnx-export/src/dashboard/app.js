
(function () {
  var box = document.getElementById('filter');
  box.hidden = false;
  box.addEventListener('input', function () {
    var q = box.value.toLowerCase();
    document.querySelectorAll('section.feature').forEach(function (s) {
      s.hidden = q !== '' && s.getAttribute('data-search').indexOf(q) < 0;
    });
  });
})();
