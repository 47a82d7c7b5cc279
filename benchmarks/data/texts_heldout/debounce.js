// Debounced search box: waits for the user to stop typing before fetching.
export function debounce(fn, wait = 250) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), wait);
  };
}

const input = document.querySelector('#search');
const list = document.querySelector('#results');

async function search(query) {
  if (query.trim().length < 2) {
    list.innerHTML = '';
    return;
  }
  const res = await fetch(`/api/search?q=${encodeURIComponent(query)}&limit=10`);
  if (!res.ok) throw new Error(`search failed: ${res.status}`);
  const { items } = await res.json();
  list.innerHTML = items.map((it) => `<li data-id="${it.id}">${it.title}</li>`).join('');
}

input.addEventListener('input', debounce((e) => search(e.target.value)));
