/** Numbers for people: byte counts, durations and rates as the CLI and the dashboard show them. */
export function humanBytes(n: number): string {
  if (n < 1000) return `${Math.round(n)}`;
  const units = ['k', 'M', 'G', 'T', 'P'];
  let v = n;
  let i = -1;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)}${units[i]}`;
}

export function humanDuration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${s % 60 ? String(s % 60).padStart(2, '0') : ''}`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h${String(m % 60).padStart(2, '0')}`;
  const d = Math.floor(h / 24);
  return `${d}d${String(h % 24).padStart(2, '0')}h`;
}

export function humanRate(perSec: number): string {
  if (perSec === 0) return '0';
  if (perSec < 10) return perSec.toFixed(1);
  return humanBytes(perSec);
}
