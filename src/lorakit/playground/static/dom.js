// Small DOM helpers shared by the views: build elements, format numbers, the model checkboxes.

// el("p", {class: "x", "data-testid": "y"}, "text", child): attributes, then children
// (strings become text nodes, so nothing from the server is ever parsed as HTML).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(
    tag === "svg" || attrs.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "svg" || value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const svgEl = (tag, attrs = {}, ...children) => el(tag, { ...attrs, svg: true }, ...children);

export function fmt(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? String(+value.toFixed(digits)) : "–";
}

export function percent(fraction) {
  return typeof fraction === "number" && Number.isFinite(fraction) ? `${(fraction * 100).toFixed(1)}%` : "–";
}

// A short message for an error from `request` (or anything thrown).
export function describe(error) {
  return error && error.message ? error.message : String(error);
}

// Fill a fieldset (keeping its legend) with one checkbox per model; `checked` is a Set of ids.
// Ids are indexed, not derived from model names, which may hold any character.
export function renderModelChoices(fieldset, prefix, models, checked) {
  const legend = fieldset.querySelector("legend");
  fieldset.replaceChildren(legend);
  models.forEach((model, i) => {
    const id = `${prefix}-model-${i}`;
    const box = el("input", { type: "checkbox", id, value: model.id, "data-model": model.id,
      checked: checked.has(model.id) });
    fieldset.append(el("label", { class: "choice", for: id }, box, model.label));
  });
}

export function checkedModels(fieldset) {
  return [...fieldset.querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value);
}

// The <select> of example sources: the built-in held-out data, then each run.
export function renderSources(select, runs, builtinLabel) {
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, builtinLabel),
    // a run's data may be a file path: its last part is enough to tell the runs apart
    ...runs.map((run) => el("option", { value: run.name },
      `run ${run.name} (${String(run.data ?? "?").split(/[\\/]/).pop()})`)));
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}
