using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using UblkSharp.Targets.Cow;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp cow`: User-Mode Linux COW files without a device. `create` is uml_mkcow,
/// `merge` is uml_moo (into a new image, or in place into the backing file), `info` shows a header.
/// </summary>
internal static class CowCommand
{
    public static Command Create() => new("cow", "UML COW overlays: create, merge (like uml_moo), info")
    {
        CreateSub(),
        MergeSub(),
        InfoSub(),
    };

    private static Command CreateSub()
    {
        var overlay = new Argument<string>("overlay") { Description = "The COW file to make" };
        var backing = new Option<string>("--backing", "-b") { Description = "The backing image", Required = true };
        var command = new Command("create", "Make a new COW file over a backing image (like uml_mkcow)") { overlay, backing };
        command.SetAction(r =>
        {
            var h = CowTarget.CreateOverlay(r.GetValue(overlay)!, r.GetValue(backing)!);
            Console.WriteLine($"{r.GetValue(overlay)}: COW file over {h.BackingFile} ({h.Size} bytes)");
            return 0;
        });
        return command;
    }

    private static Command MergeSub()
    {
        var overlay = new Argument<string>("overlay") { Description = "The COW file" };
        var into = new Option<string?>("--into", "-o") { Description = "Write the merged image to this new file (default: merge into the backing file, in place)" };
        var backing = new Option<string?>("--backing", "-b") { Description = "Use this backing file instead of the one the COW header names" };
        var ignore = new Option<bool>("--ignore-backing-mismatch") { Description = "Merge even if the backing file's size or mtime changed" };
        var quiet = new Option<bool>("--quiet", "-q") { Description = "No progress" };
        var command = new Command("merge", "Fold a COW file into an image, as uml_moo does") { overlay, into, backing, ignore, quiet };
        command.SetAction(r =>
        {
            var options = new CowOpenOptions { BackingFile = r.GetValue(backing), IgnoreBackingMismatch = r.GetValue(ignore) };
            var target = r.GetValue(into);
            using var bar = r.GetValue(quiet) ? null : new ProgressLine(target is null ? "merging into the backing file" : $"merging into {target}");
            var result = CowMerge.Merge(r.GetValue(overlay)!, target, options, bar is null ? null : bar.Report);
            bar?.Done();
            Console.WriteLine(result.InPlace
                ? $"merged {result.CowSectors} COW sectors into {result.Output} ({result.Bytes} bytes written); the COW file no longer matches it"
                : $"wrote {result.Output} ({result.Bytes} bytes; {result.CowSectors} sectors from the COW file)");
            return 0;
        });
        return command;
    }

    private static Command InfoSub()
    {
        var overlay = new Argument<string>("overlay") { Description = "The COW file" };
        var command = new Command("info", "Show a COW file's header and how much of the disk it holds") { overlay };
        command.SetAction(r =>
        {
            var path = r.GetValue(overlay)!;
            var h = CowTarget.ReadHeader(path);
            var i = CultureInfo.InvariantCulture;
            Console.WriteLine(string.Create(i, $"version       {h.Version}{(h.IsBrokenV3Layout ? " (the broken 64-bit layout)" : "")}"));
            Console.WriteLine($"backing file  {h.BackingFile}");
            Console.WriteLine(string.Create(i, $"backing size  {h.Size}"));
            Console.WriteLine(string.Create(i, $"backing mtime {DateTimeOffset.FromUnixTimeSeconds(h.MTime):yyyy-MM-dd HH:mm:ss} UTC ({h.MTime})"));
            Console.WriteLine(string.Create(i, $"sector size   {h.SectorSize}"));
            Console.WriteLine(string.Create(i, $"alignment     {h.Alignment}"));
            Console.WriteLine(string.Create(i, $"bitmap        {h.BitmapLength} bytes at {h.BitmapOffset}; data at {h.DataOffset}"));
            try
            {
                using var t = new CowTarget(path, new CowOpenOptions { ReadOnly = true, IgnoreBackingMismatch = true });
                var cow = t.CowSectors;
                Console.WriteLine(string.Create(i, $"in COW file   {cow} of {h.BitmapSectors} sectors ({100.0 * cow / h.BitmapSectors:0.##}%)"));
            }
            catch (IOException e)
            {
                Console.WriteLine($"in COW file   unknown: {e.Message}");
            }
            return 0;
        });
        return command;
    }
}

/// <summary>
/// A progress line on stderr: redrawn in place when stderr is a terminal, otherwise a line
/// every 10% (and never more often than every 2 s), so that logs stay readable.
/// </summary>
internal sealed class ProgressLine(string label) : IDisposable
{
    private readonly bool _tty = !Console.IsErrorRedirected;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private long _lastDraw = -1;
    private int _lastDecile = -1;
    private bool _drawn;

    public void Report(long done, long total)
    {
        var now = _clock.ElapsedMilliseconds;
        var fraction = total <= 0 ? 1 : Math.Clamp((double)done / total, 0, 1);
        if (_tty)
        {
            if (_lastDraw >= 0 && now - _lastDraw < 100 && done < total)
            {
                return;
            }
            const int width = 30;
            var fill = (int)(fraction * width);
            Console.Error.Write(string.Create(CultureInfo.InvariantCulture,
                $"\r{label} [{new string('#', fill)}{new string('.', width - fill)}] {fraction * 100,5:0.0}% {Rate(done, now)}  "));
            _drawn = true;
        }
        else
        {
            var decile = (int)(fraction * 10);
            if (decile == _lastDecile || (now - _lastDraw < 2000 && decile < 10))
            {
                return;
            }
            _lastDecile = decile;
            Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{label}: {fraction * 100:0}% {Rate(done, now)}"));
        }
        _lastDraw = now;
    }

    public void Done()
    {
        if (_tty && _drawn)
        {
            Console.Error.WriteLine();
            _drawn = false;
        }
    }

    public void Dispose() => Done();

    private static string Rate(long done, long ms)
        => ms <= 0 ? "" : string.Create(CultureInfo.InvariantCulture, $"({done / 1048576.0 / (ms / 1000.0):0} MiB/s)");
}
