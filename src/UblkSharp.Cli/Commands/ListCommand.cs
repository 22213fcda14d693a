using System.CommandLine;
using System.Text.Json;
using UblkSharp.Cli.Logging;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>`ublksharp list`: live state read from the kernel, with the target each daemon recorded.</summary>
internal static class ListCommand
{
    public static Command Create()
    {
        var json = new Option<bool>("--json") { Description = "Print JSON" };
        var command = new Command("list", "List ublk devices") { json };
        command.SetAction(r =>
        {
            Preflight.RequireDriver();
            using var control = ControlDevice.Open();
            var rows = new List<Row>();
            var hidden = 0;
            foreach (var id in DeviceList.Ids())
            {
                DevInfo info;
                try
                {
                    info = control.GetDeviceInfo(id);
                }
                catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
                {
                    continue; // deleted while we looked
                }
                catch (ErrnoException e) when (e.Errno is Errno.EACCES or Errno.EPERM && !Processes.IsRoot)
                {
                    hidden++; // another user's or root's: the kernel shows a user only their own
                    continue;
                }
                long size = 0;
                try
                {
                    size = (long)control.GetParams(id).basic.dev_sectors << 9;
                }
                catch (ErrnoException)
                {
                }
                DeviceRecord? record = null;
                try
                {
                    record = DeviceRecord.Load(id);
                }
                catch (UnsafeStateFileException e)
                {
                    // One bad recipe must not hide the other devices: listed as having none.
                    CliLog.Warning($"device {id}: {e.Message}");
                }
                rows.Add(new Row(id, ((DeviceState)info.state).ToString().ToUpperInvariant(), info.ublksrv_pid, info.nr_hw_queues, info.queue_depth,
                    size, record?.Target ?? "?", UblkFeatureNames.Format((UblkFeatures)info.flags), DataPath((UblkFeatures)info.flags), (info.flags & (ulong)UblkFeatures.BatchIo) != 0, $"/dev/ublkb{id}", record?.Recipe,
                    Orphans.Reason(id, info, record), record?.Version));
            }
            if (r.GetValue(json))
            {
                WriteJson(rows);
            }
            else
            {
                Console.WriteLine($"{"ID",-4} {"STATE",-9} {"PID",-8} {"QUEUES",-6} {"DEPTH",-5} {"SIZE",-10} {"TARGET",-7} {"PATH",-14} {"VERSION",-14} {"DATA",-15} FLAGS");
                foreach (var x in rows)
                {
                    Console.WriteLine($"{x.Id,-4} {(x.Orphan is null ? x.State : "ORPHAN"),-9} {x.Pid,-8} {x.Queues,-6} {x.Depth,-5} {ByteSize.Format(x.Size),-10} {x.Target,-7} {x.Path,-14} {ShortVersion(x.Version),-14} {x.Data + (x.Batch ? "+batch" : ""),-15} {x.Flags}");
                }
                // The reason would not fit a column: one line per orphan under the table.
                foreach (var x in rows.Where(x => x.Orphan is not null))
                {
                    Console.WriteLine($"device {x.Id} is an orphan (kernel state {x.State}): {x.Orphan}; 'ublksharp del -n {x.Id}' removes it");
                }
                if (hidden > 0)
                {
                    Console.WriteLine($"({hidden} device{(hidden == 1 ? "" : "s")} of other users or root not shown)");
                }
            }
            return 0;
        });
        return command;
    }

    private static void WriteJson(List<Row> rows)
    {
        using var stdout = Console.OpenStandardOutput();
        using (var w = new Utf8JsonWriter(stdout, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartArray();
            foreach (var x in rows)
            {
                w.WriteStartObject();
                w.WriteNumber("id", x.Id);
                w.WriteString("state", x.State.ToLowerInvariant());
                // Why nothing can bring the device back (only del helps), or null.
                w.WriteString("orphan", x.Orphan);
                w.WriteString("version", x.Version);
                w.WriteNumber("pid", x.Pid);
                w.WriteNumber("queues", x.Queues);
                w.WriteNumber("depth", x.Depth);
                w.WriteNumber("size", x.Size);
                w.WriteString("target", x.Target);
                w.WriteString("flags", x.Flags);
                w.WriteString("data", x.Data);
                w.WriteBoolean("batch", x.Batch);
                // The same, as a list: which ublk features (recovery mode, SAFE_STOP_DEV, ...) the device uses.
                w.WriteStartArray("features");
                foreach (var name in x.Flags.Split('|', StringSplitOptions.RemoveEmptyEntries).Where(n => n != "none"))
                {
                    w.WriteStringValue(name);
                }
                w.WriteEndArray();
                w.WriteString("path", x.Path);
                w.WriteStartObject("options");
                foreach (var (k, v) in x.Recipe ?? [])
                {
                    w.WriteString(k, v);
                }
                w.WriteEndObject();
                w.WriteEndObject();
            }
            w.WriteEndArray();
        }
        Console.WriteLine();
    }

    // "1.0.0+<40 hex digits>" is too wide for a table: the commit as git abbreviates it.
    private static string ShortVersion(string? version)
    {
        if (version is null)
        {
            return "-";
        }
        var plus = version.IndexOf('+', StringComparison.Ordinal);
        return plus >= 0 && version.Length > plus + 8 ? version[..(plus + 8)] : version;
    }

    /// <summary>How request data reaches the daemon: zero-copy (AUTO_BUF_REG), user-copy (USER_COPY), or copy (the driver copies into the daemon's buffers).</summary>
    internal static string DataPath(UblkFeatures flags)
        => (flags & (UblkFeatures.AutoBufReg | UblkFeatures.SupportZeroCopy)) != 0 ? "zero-copy" : (flags & UblkFeatures.UserCopy) != 0 ? "user-copy" : "copy";

    private sealed record Row(uint Id, string State, int Pid, int Queues, int Depth, long Size, string Target, string Flags, string Data, bool Batch, string Path,
        Dictionary<string, string>? Recipe, string? Orphan, string? Version);
}
