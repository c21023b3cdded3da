// atelier's web page: plain JS on the native HTTP API (/v1/…), no build step.
'use strict';

const $ = (selector) => document.querySelector(selector);
const form = $('#form');
const field = (name) => form.elements.namedItem(name);

// Chromium opens six connections per host over HTTP/1.1 and every event stream holds one:
// follow at most four jobs at once, so submits and cancels always find a free connection.
const MAX_STREAMS = 4;
const LIVE_DEBOUNCE_MS = 150;
const TERMINAL = new Set(['done', 'failed', 'cancelled']);

// A live session is this tab's: sessionStorage keeps it across a reload of the tab, not beyond.
// getRandomValues, not randomUUID: the page may be served over plain HTTP beyond localhost.
const session = sessionStorage.getItem('atelier.session') || (() => {
  const id = 'web-' + [...crypto.getRandomValues(new Uint8Array(12))]
    .map((b) => b.toString(16).padStart(2, '0')).join('');
  sessionStorage.setItem('atelier.session', id);
  return id;
})();

const jobs = new Map();   // job id -> the API's view of it, plus what this page made of it
let models = new Map();
let stageId = null;       // the job the big image and progress bar show

const terminal = (job) => TERMINAL.has(job.state);
const superseded = (job) => job.state === 'cancelled' && /superseded/.test(job.reason || '');
const isLive = (job) => job.spec.priority === 'live';
// How an output is shown: MP4 in a <video>, a sound in an <audio>; images, GIF and WebP in an <img>.
const playerOf = (job) => job.spec.output_format === 'mp4' ? 'video'
  : ['wav', 'flac'].includes(job.spec.output_format) ? 'audio' : 'img';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- the API, with the token ----------------------------------------------- //

let token = localStorage.getItem('atelier.token') || '';
let asking = null;  // one token prompt answers every request that got a 401 meanwhile

// The token only ever travels in a header: EventSource cannot send one, so streams are read with
// fetch too, and images are fetched as blobs rather than put in <img src> as URLs.
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers);
    if (token) headers.set('Authorization', `Bearer ${token}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await askToken((await problem(response)).message);
  }
}

function askToken(message) {
  asking ||= new Promise((resolve, reject) => {
    const dialog = $('#auth');
    $('#auth-message').textContent = message || 'This server needs a token.';
    $('#token').value = token;
    dialog.addEventListener('close', () => {
      asking = null;
      if (dialog.returnValue !== 'save') return reject(new Error('this server needs a token'));
      token = $('#token').value.trim();
      localStorage.setItem('atelier.token', token);
      resolve();
    }, { once: true });
    dialog.returnValue = '';
    dialog.showModal();
  });
  return asking;
}

// The API's error body as an Error that names the field, and when to come back after a 429.
async function problem(response) {
  const body = await response.json().catch(() => ({}));
  const error = body.error || {};
  return Object.assign(new Error(error.message || `${response.status} ${response.statusText}`), {
    status: response.status, field: error.field,
    retryAfter: Number(response.headers.get('Retry-After')) || error.retry_after_s || 1,
  });
}

async function json(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await problem(response);
  return response.json();
}

// Artifacts are fetched by name from this page's own server: the URL in a job names the server's
// public address, which need not be this origin, and the token must not go anywhere else.
const images = new Map();  // artifact URL -> promise of an object URL, so each is fetched once
function image(url) {
  if (!images.has(url)) {
    const name = url.split('/').pop();
    images.set(url, api(`v1/artifacts/${encodeURIComponent(name)}`).then(async (response) => {
      if (!response.ok) throw await problem(response);
      return URL.createObjectURL(await response.blob());
    }).catch((error) => { images.delete(url); throw error; }));
  }
  return images.get(url);
}

// -- jobs and their event streams ------------------------------------------ //

function upsert(view) {
  let job = jobs.get(view.spec.id);
  if (!job) {
    job = { id: view.spec.id, step: 0, total: view.spec.steps || 0, preview: null, final: null,
            abort: new AbortController() };
    jobs.set(job.id, job);
  }
  // An ended job stays ended: a reply sent before its end (a cancel's answer, a slow list) can
  // arrive after the stream has told its end, and must not bring it back to life.
  if (terminal(job) && !TERMINAL.has(view.state)) return job;
  Object.assign(job, { spec: view.spec, state: view.state, reason: view.reason, position: view.position,
                       eta_s: view.eta_s, submitted_at: view.submitted_at, urls: view.urls || [] });
  return job;
}

let streams = 0;
const waiting = [];
async function follow(job) {
  if (job.following) return;
  job.following = true;
  if (streams < MAX_STREAMS) streams++;
  else await new Promise((resolve) => waiting.push(resolve));  // a finished stream hands its place over
  try {
    // A dropped connection is not the job's end: read again, from its latest state, until it ends.
    for (let attempt = 0; !terminal(job) && !job.abort.signal.aborted; attempt++) {
      try {
        await readEvents(job);
      } catch (error) {
        if (job.abort.signal.aborted || (error.status >= 400 && error.status < 500)) return;
      }
      if (!terminal(job)) await sleep(Math.min(5000, 250 * 2 ** attempt));
    }
  } finally {
    job.following = false;
    const next = waiting.shift();
    if (next) next(); else streams--;
  }
}

// Server-Sent Events by hand: `event:` names the next `data:`, a blank line ends the event.
async function readEvents(job) {
  const response = await api(`v1/jobs/${job.id}/events`, { signal: job.abort.signal });
  if (!response.ok) throw await problem(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '', name = 'message', data = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, '');
      buffer = buffer.slice(end + 1);
      if (line === '') {
        if (data) onEvent(job, name, JSON.parse(data));
        name = 'message';
        data = '';
      } else if (line.startsWith('event:')) {
        name = line.slice(6).trim();
      } else if (line.startsWith('data:')) {
        data += (data ? '\n' : '') + line.slice(5).replace(/^ /, '');
      }  // anything else (": keep-alive") is a comment
    }
  }
}

function onEvent(job, name, data) {
  if (name === 'state') {
    Object.assign(job, { state: data.state, reason: data.reason, position: data.position, eta_s: data.eta_s });
  } else if (name === 'progress') {
    Object.assign(job, { step: data.step, total: data.total, eta_s: data.eta_s });
  } else if (name === 'preview') {
    job.preview = data.image;
  } else if (name === 'result') {
    upsert(data);
    if (job.state === 'done') addToGallery(job);
  }
  show(job);
}

function show(job) {
  if (superseded(job)) return;  // a newer prompt of the same live session took its place: nothing to say
  if (!isLive(job)) row(job);
  if (job.id === stageId) renderStage();
}

// -- what the user sees ------------------------------------------------------ //

function seconds(s) {
  if (s == null) return '';
  s = Math.max(0, Math.round(s));
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

function describe(job) {
  const eta = job.eta_s != null && !terminal(job) ? ` · ETA ${seconds(job.eta_s)}` : '';
  switch (job.state) {
    case 'queued': return (job.position != null ? `#${job.position + 1} in queue` : 'Queued') + eta;
    case 'assigned': return 'Starting' + eta;
    case 'loading': return 'Loading the model' + eta;
    case 'running': return (job.total ? `Step ${job.step}/${job.total}` : 'Running') + eta;
    case 'done': return 'Done';
    case 'failed': return `Failed: ${job.reason || 'no reason given'}`;
    case 'cancelled': return job.reason && job.reason !== 'cancelled' ? `Cancelled: ${job.reason}` : 'Cancelled';
    default: return job.state;
  }
}

const fraction = (job) => job.state === 'done' ? 1 : job.state === 'running' && job.total ? job.step / job.total : 0;

function stage(job) {
  stageId = job.id;
  renderStage();
}

let shown = null;  // the src the big image shows, and so the job whose image it is
function renderStage() {
  const job = jobs.get(stageId);
  if (!job) return;
  if (job.state === 'done' && job.urls.length && !job.final) {
    image(job.urls[0]).then((src) => { job.final = src; if (job.id === stageId) renderStage(); }, () => {});
  }
  const img = $('#preview');
  const player = playerOf(job);
  // A video or a sound plays in its own element; the image keeps the last preview (a sound's loudness).
  const src = (player === 'img' && job.final) || job.preview;
  for (const [kind, element] of [['video', $('#video')], ['audio', $('#audio')]]) {
    const mine = kind === player && job.final;
    if (mine && element.dataset.job !== job.id) Object.assign(element, { src: job.final }).dataset.job = job.id;
    element.hidden = !mine;
  }
  if (player === 'video' && job.final) img.hidden = true;
  else if (src && src !== shown) {
    shown = src;
    img.src = src;
    img.dataset.job = job.id;
    img.dataset.prompt = job.spec.prompt;
    img.alt = job.spec.prompt;
    img.hidden = false;
    $('#empty').hidden = true;
  }
  // Until the new job's first preview, the last image stays, dimmed, so the page does not flash.
  img.classList.toggle('stale', img.dataset.job !== job.id);
  img.classList.toggle('final', img.dataset.job === job.id && !!job.final);
  $('#frame').style.aspectRatio = `${job.spec.width || 1} / ${job.spec.height || 1}`;
  $('#caption').textContent = job.spec.prompt;
  $('#status').textContent = describe(job);
  $('#status').dataset.state = job.state;
  $('#stage').dataset.state = job.state;
  $('#stage').dataset.job = job.id;
  $('#bar').style.width = `${fraction(job) * 100}%`;
  $('#cancel').hidden = terminal(job);
}

function row(job) {
  if (!job.el) {
    const li = job.el = document.createElement('li');
    li.dataset.job = job.id;
    li.dataset.t = job.submitted_at;
    li.innerHTML = '<div class="text"><span class="prompt"></span><span class="meta"></span>' +
                   '<span class="state"></span></div><button class="ghost" type="button">Cancel</button>' +
                   '<div class="bar"><span></span></div>';
    li.querySelector('.prompt').textContent = job.spec.prompt;
    const { model, width, height, steps, count, seed, controlnet, inputs = [] } = job.spec;
    li.querySelector('.meta').textContent = [model, width && `${width}×${height}`, steps && `${steps} steps`,
      count > 1 && `×${count}`, seed != null && `seed ${seed}`, controlnet && `ControlNet ${controlnet}`,
      inputs.includes('ip_adapter_image') && 'reference image'].filter(Boolean).join(' · ');
    li.querySelector('button').addEventListener('click', (event) => { event.stopPropagation(); cancel(job); });
    li.addEventListener('click', () => stage(job));
    insertByTime($('#jobs'), li);
  }
  job.el.dataset.state = job.state;
  job.el.querySelector('.state').textContent = describe(job);
  job.el.querySelector('.bar span').style.width = `${fraction(job) * 100}%`;
  job.el.querySelector('button').hidden = terminal(job);
}

// Newest first, by when each job was submitted (a late result does not jump the queue).
function insertByTime(list, element) {
  const t = Number(element.dataset.t);
  const later = [...list.children].find((other) => Number(other.dataset.t) < t);
  list.insertBefore(element, later || null);
}

const lazy = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    lazy.unobserve(entry.target);
    image(entry.target.dataset.src).then((src) => { entry.target.src = src; },
                                         () => entry.target.classList.add('broken'));
  }
}, { rootMargin: '400px' });

function addToGallery(job) {
  const gallery = $('#gallery');
  if (gallery.querySelector(`[data-job="${job.id}"]`)) return;
  // A live session is one picture that changes as its prompt does: keep only its newest image.
  if (isLive(job) && job.spec.session) {
    for (const tile of gallery.querySelectorAll(`[data-session="${CSS.escape(job.spec.session)}"]`)) {
      if (Number(tile.dataset.t) > job.submitted_at) return;
      tile.remove();
    }
  }
  job.urls.forEach((url, index) => {
    const tile = document.createElement('button');
    tile.type = 'button';
    tile.className = 'tile';
    Object.assign(tile.dataset, { job: job.id, t: job.submitted_at, prompt: job.spec.prompt });
    if (isLive(job) && job.spec.session) tile.dataset.session = job.spec.session;
    tile.title = job.spec.prompt;
    // A video plays in its tile, muted; a sound shows its name (its player is in the viewer).
    const player = playerOf(job);
    const media = document.createElement(player === 'video' ? 'video' : player === 'audio' ? 'span' : 'img');
    if (player === 'audio') {
      media.className = 'sound';
      media.textContent = `♪ ${job.spec.prompt}`;
    } else {
      Object.assign(media, player === 'video' ? { muted: true, loop: true, autoplay: true, playsInline: true }
                                              : { alt: job.spec.prompt });
      media.dataset.src = url;
      lazy.observe(media);
    }
    tile.append(media);
    tile.addEventListener('click', () => openViewer(job, index));
    insertByTime(gallery, tile);
  });
}

async function openViewer(job, index) {
  const src = await image(job.urls[index]).catch(() => null);
  if (!src) return;
  const player = playerOf(job);
  for (const [kind, element] of [['img', $('#viewer-img')], ['video', $('#viewer-video')],
                                 ['audio', $('#viewer-audio')]]) {
    element.hidden = kind !== player;
    if (kind === player) element.src = src; else element.removeAttribute('src');
  }
  $('#viewer-img').alt = job.spec.prompt;
  $('#viewer-caption').textContent = `${job.spec.prompt} · seed ${job.spec.seed + index}`;
  $('#viewer-download').href = src;
  $('#viewer-download').download = job.urls[index].split('/').pop();
  $('#viewer').showModal();
}

function showError(error) {
  $('#form-error').textContent = error ? error.message : '';
  for (const input of form.querySelectorAll('[aria-invalid]')) input.removeAttribute('aria-invalid');
  const named = error && error.field && field(error.field);
  if (named) named.setAttribute('aria-invalid', 'true');
}

// -- the form ---------------------------------------------------------------- //

// What the model does from a prompt alone, or from an image: the same preference as the CLI's and
// Discord's (an image, else a video, else a sound; an edit, else an upscale, else a video).
function defaultKind(model, fromImage) {
  const preferred = fromImage ? ['img2img', 'upscale', 'img2vid'] : ['txt2img', 'txt2vid', 'txt2audio'];
  return preferred.find((kind) => model.kinds.includes(kind)) || null;
}

const readAsDataURL = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

// "name:0.8, other" -> {name: 0.8, other: 1}
function parseLoras(text) {
  const loras = {};
  for (const part of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const [name, scale] = part.split(':').map((p) => p.trim());
    loras[name] = scale === undefined || scale === '' ? 1 : Number(scale);
  }
  return loras;
}

async function specFromForm() {
  const model = models.get(field('model').value);
  const file = field('image').files[0];
  const spec = { model: field('model').value, prompt: field('prompt').value };
  if (model) spec.kind = defaultKind(model, !!file) || undefined;
  // A job from an image keeps the image's size: width and height are left to it.
  const names = ['steps', 'count', 'seed', 'frames', 'fps', ...(file ? [] : ['width', 'height'])];
  for (const name of names) {
    if (!field(name).closest('[hidden]') && field(name).value !== '') spec[name] = Number.parseInt(field(name).value, 10);
  }
  for (const name of ['guidance', 'strength', 'duration_s']) {
    if (!field(name).closest('[hidden]') && field(name).value !== '') spec[name] = Number.parseFloat(field(name).value);
  }
  if (field('negative_prompt').value.trim()) spec.negative_prompt = field('negative_prompt').value;
  if (!field('loras').hidden && field('loras').value.trim()) spec.loras = parseLoras(field('loras').value);
  if (file) spec.image = await readAsDataURL(file);
  Object.assign(spec, await conditioningFromForm());
  return spec;
}

// The ControlNet with its control image, and the IP-Adapter's reference image, each with its scale:
// only what the chosen model shows, and a scale only beside its image (the API refuses one alone).
async function conditioningFromForm() {
  const spec = {};
  const scale = (name) => field(name).value === '' ? {} : { [name]: Number.parseFloat(field(name).value) };
  const control = field('control_image').files[0];
  if (!field('controlnet').closest('[hidden]') && field('controlnet').value && control) {
    Object.assign(spec, { controlnet: field('controlnet').value, control_image: await readAsDataURL(control) },
                  scale('controlnet_scale'));
  }
  const reference = field('ip_adapter_image').files[0];
  if (!field('ip_adapter_image').closest('[hidden]') && reference) {
    Object.assign(spec, { ip_adapter_image: await readAsDataURL(reference) }, scale('ip_adapter_scale'));
  }
  return spec;
}

// A server from before ControlNets were listed says nothing of them: none, then.
const controlnetsOf = (model) => model.controlnets || [];

// Shows the fields the chosen model uses: an image to start from, a video's frames, a sound's length, LoRAs,
// a ControlNet and its control image, an IP-Adapter's reference image.
function fitForm() {
  const model = models.get(field('model').value);
  if (!model) return;
  const takesImage = !!defaultKind(model, true);
  const needsImage = !defaultKind(model, false);
  const file = field('image').files[0];
  const visible = {
    'image-input': takesImage, strength: model.kinds.includes('img2img') && !!file,
    video: model.media === 'video', audio: model.media === 'audio', sized: model.media !== 'audio' && !file,
    loras: model.loras.length > 0,
    controlnets: controlnetsOf(model).length > 0, control: !!field('controlnet').value,
    'ip-adapter': !!model.ip_adapter, reference: !!field('ip_adapter_image').files[0],
  };
  for (const element of document.querySelectorAll('[data-for]')) element.hidden = !visible[element.dataset.for];
  field('image').required = needsImage;
  // A chosen ControlNet reads a control image: without one the browser asks for it, as for a needed image.
  field('control_image').required = visible.controlnets && visible.control;
  $('#image-hint').textContent = needsImage ? `(${defaultKind(model, true)}: needed)` : '(optional: start from it)';
  $('#loras-hint').textContent = model.loras.length ? `(${model.loras.join(', ')})` : '';
}

async function submit(spec) {
  const view = await json('v1/jobs', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                                       body: JSON.stringify(spec) });
  showError(null);
  return upsert(view);
}

async function cancel(job) {
  try {
    upsert(await json(`v1/jobs/${job.id}`, { method: 'DELETE' }));
    show(job);
  } catch (error) {
    showError(error);
  }
}

function applyDefaults() {
  const model = models.get(field('model').value);
  if (!model) return;
  localStorage.setItem('atelier.model', model.id);
  Object.assign(field('width'), { value: model.default_width, max: model.max_width });
  Object.assign(field('height'), { value: model.default_height, max: model.max_height });
  field('steps').value = model.default_steps;
  field('guidance').placeholder = `${model.default_guidance}`;
  Object.assign(field('count'), { max: model.max_count });
  Object.assign(field('frames'), { value: model.default_frames ?? '', max: model.max_frames ?? '' });
  field('fps').value = model.default_fps ?? '';
  Object.assign(field('duration_s'), { value: model.default_duration_s ?? '', max: model.max_duration_s ?? '' });
  if (!defaultKind(model, true)) field('image').value = '';
  // The ControlNets are the model's own: a name chosen for another model means nothing here.
  field('controlnet').replaceChildren(new Option('none', ''),
                                     ...controlnetsOf(model).map((name) => new Option(name, name)));
  if (!controlnetsOf(model).length) field('control_image').value = '';
  if (!model.ip_adapter) field('ip_adapter_image').value = '';
  fitForm();
}

async function loadModels() {
  models = new Map((await json('v1/models')).data.map((model) => [model.id, model]));
  field('model').replaceChildren(...[...models.keys()].map((id) => new Option(id, id)));
  const saved = localStorage.getItem('atelier.model');
  const fallback = [...models.values()].find((model) => model.default);
  if (models.has(saved)) field('model').value = saved;
  else if (fallback) field('model').value = fallback.id;
  applyDefaults();
}

// The caller's jobs as the scheduler remembers them: the gallery and the list survive a reload.
async function restore() {
  const views = (await json('v1/jobs?limit=100')).jobs;  // newest first
  let newest = null;
  for (const view of views.reverse()) {
    const job = upsert(view);
    if (superseded(job)) continue;
    newest = job;
    if (job.state === 'done') addToGallery(job);
    show(job);
    if (!terminal(job)) follow(job);
  }
  if (newest && !stageId) stage(newest);
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  try {
    const job = await submit(await specFromForm());
    show(job);
    stage(job);
    follow(job);
  } catch (error) {
    showError(error);
  }
});

$('#cancel').addEventListener('click', () => { const job = jobs.get(stageId); if (job) cancel(job); });
field('model').addEventListener('change', applyDefaults);
field('image').addEventListener('change', fitForm);
field('controlnet').addEventListener('change', fitForm);
field('ip_adapter_image').addEventListener('change', fitForm);

// -- live mode ---------------------------------------------------------------- //
// Each change submits the whole form as a live job of this tab's session; the scheduler replaces
// or stops the session's older job. Submits go one at a time, so the scheduler sees the prompts in
// the order they were typed, and the stage follows only the newest: an older job's late preview
// or image never shows as the latest.

let liveJob = null, liveSent = '', liveBusy = false, liveAgain = false, liveTimer = 0, liveSeed = 0;

function liveChanged(event) {
  if (!$('#live').checked || event.target.id === 'live') return;
  clearTimeout(liveTimer);
  liveTimer = setTimeout(submitLive, LIVE_DEBOUNCE_MS);
}

async function submitLive() {
  if (!$('#live').checked) return;
  if (liveBusy) { liveAgain = true; return; }
  liveBusy = true;
  try {
    const spec = { seed: liveSeed, ...await specFromForm(), priority: 'live', session };
    const key = JSON.stringify(spec);
    if (!spec.prompt.trim() || key === liveSent) return;
    const job = await submit(spec);
    liveSent = key;
    if (liveJob && liveJob !== job) liveJob.abort.abort();  // superseded: its stream has nothing left to say
    liveJob = job;
    stage(job);
    follow(job);
  } catch (error) {
    showError(error);
    if (error.status === 429) {  // rate limited or the queue is full: try the latest prompt again later
      clearTimeout(liveTimer);
      liveTimer = setTimeout(submitLive, error.retryAfter * 1000);
    }
  } finally {
    liveBusy = false;
    if (liveAgain) { liveAgain = false; submitLive(); }
  }
}

form.addEventListener('input', liveChanged);
$('#live').addEventListener('change', () => {
  document.body.classList.toggle('live', $('#live').checked);
  if (!$('#live').checked) return;
  // One seed while the user types, unless they chose one: the picture changes with the words, not by chance.
  liveSeed = crypto.getRandomValues(new Uint32Array(1))[0];
  liveSent = '';
  submitLive();
});

// -- the token button, the viewer, start ------------------------------------------ //

$('#token-button').addEventListener('click', () => askToken('The token this server gave you, if it needs one.')
  .then(() => start(), () => {}));
$('#viewer').addEventListener('click', (event) => { if (event.target.id === 'viewer') $('#viewer').close(); });

async function start() {
  try {
    await loadModels();
    await restore();
    showError(null);
  } catch (error) {
    showError(error);
  }
}

start();
