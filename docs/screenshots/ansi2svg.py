#!/usr/bin/env python3
"""Turns a terminal screen captured with `tmux capture-pane -e -p` (text + SGR escapes) into
an SVG: one monospace cell per character, colours and bold/reverse kept.

Usage: ansi2svg.py TITLE < screen.ansi > screen.svg
"""
import html
import re
import sys

PALETTE = ["#1e1e1e", "#e05561", "#8cc265", "#d18f52", "#4aa5f0", "#c162de", "#42b3c2", "#d7dae0",
           "#5c6370", "#ff616e", "#a5e075", "#f0a45d", "#4dc4ff", "#de73ff", "#4cd1e0", "#ffffff"]
FG, BG = "#d7dae0", "#1e1e1e"
CW, CH = 8.4, 17  # cell size in px


def xterm256(n):
    if n < 16:
        return PALETTE[n]
    if n < 232:
        n -= 16
        v = [0, 95, 135, 175, 215, 255]
        return "#%02x%02x%02x" % (v[n // 36], v[(n // 6) % 6], v[n % 6])
    g = 8 + (n - 232) * 10
    return "#%02x%02x%02x" % (g, g, g)


def parse(lines):
    """Yields rows of cells (char, fg, bg, bold)."""
    rows = []
    st = {"fg": None, "bg": None, "bold": False, "dim": False, "rev": False}
    for line in lines:
        row = []
        for m in re.finditer(r"\x1b\[([0-9;]*)m|([^\x1b])", line):
            if m.group(2) is not None:
                fg = st["fg"] or FG
                bg = st["bg"]
                if st["dim"] and st["fg"] is None:
                    fg = "#7f848e"
                if st["rev"]:
                    fg, bg = (bg or BG), fg
                row.append((m.group(2), fg, bg, st["bold"]))
                continue
            codes = [int(c) if c else 0 for c in m.group(1).split(";")]
            i = 0
            while i < len(codes):
                c = codes[i]
                if c == 0:
                    st = {"fg": None, "bg": None, "bold": False, "dim": False, "rev": False}
                elif c == 1:
                    st["bold"] = True
                elif c == 2:
                    st["dim"] = True
                elif c == 22:
                    st["bold"] = st["dim"] = False
                elif c == 7:
                    st["rev"] = True
                elif c == 27:
                    st["rev"] = False
                elif 30 <= c <= 37:
                    st["fg"] = PALETTE[c - 30]
                elif 90 <= c <= 97:
                    st["fg"] = PALETTE[c - 90 + 8]
                elif c == 39:
                    st["fg"] = None
                elif 40 <= c <= 47:
                    st["bg"] = PALETTE[c - 40]
                elif 100 <= c <= 107:
                    st["bg"] = PALETTE[c - 100 + 8]
                elif c == 49:
                    st["bg"] = None
                elif c in (38, 48) and i + 1 < len(codes):
                    if codes[i + 1] == 5 and i + 2 < len(codes):
                        col = xterm256(codes[i + 2])
                        i += 2
                    elif codes[i + 1] == 2 and i + 4 < len(codes):
                        col = "#%02x%02x%02x" % tuple(codes[i + 2:i + 5])
                        i += 4
                    else:
                        col = None
                    st["fg" if c == 38 else "bg"] = col
                i += 1
        rows.append(row)
    return rows


def main():
    title = sys.argv[1] if len(sys.argv) > 1 else "itewatch live"
    rows = parse(sys.stdin.read().rstrip("\n").split("\n"))
    width = max((len(r) for r in rows), default=80)
    w, h = width * CW + 20, len(rows) * CH + 44
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
           f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="14">',
           f"<title>{html.escape(title)}</title>",
           f'<rect width="100%" height="100%" rx="6" fill="{BG}"/>',
           f'<text x="10" y="18" fill="#7f848e" font-size="12">{html.escape(title)}</text>']
    for y, row in enumerate(rows):
        top = 28 + y * CH
        # backgrounds
        x = 0
        while x < len(row):
            bg = row[x][2]
            run = x
            while run < len(row) and row[run][2] == bg:
                run += 1
            if bg:
                out.append(f'<rect x="{10 + x * CW:.1f}" y="{top:.0f}" width="{(run - x) * CW:.1f}" '
                           f'height="{CH}" fill="{bg}"/>')
            x = run
        # text runs of the same style
        x = 0
        while x < len(row):
            fg, bold = row[x][1], row[x][3]
            run = x
            while run < len(row) and row[run][1] == fg and row[run][3] == bold:
                run += 1
            text = "".join(c[0] for c in row[x:run])
            if text.strip():
                weight = ' font-weight="bold"' if bold else ""
                out.append(f'<text x="{10 + x * CW:.1f}" y="{top + 13:.0f}" fill="{fg}"{weight} '
                           f'xml:space="preserve" textLength="{(run - x) * CW:.1f}" '
                           f'lengthAdjust="spacingAndGlyphs">{html.escape(text)}</text>')
            x = run
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main()
