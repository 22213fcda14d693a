using System.CommandLine;
using System.Globalization;
using UblkSharp.Targets.Qcow2;

namespace UblkSharp.Cli.Commands;

/// <summary>`ublksharp qcow2 info IMAGE`: a qcow2 image's header, backing chain, snapshots and allocation, without a device.</summary>
internal static class Qcow2Command
{
    public static Command Create() => new("qcow2", "qcow2 images: info")
    {
        InfoSub(),
    };

    private static Command InfoSub()
    {
        var image = new Argument<string>("image") { Description = "The qcow2 image" };
        var backing = new Option<string?>("--backing", "-b") { Description = "Use this backing file instead of the one the image names" };
        var snapshot = new Option<string?>("--snapshot") { Description = "Count the clusters of this snapshot (id or name) instead of the active image" };
        var command = new Command("info", "Show a qcow2 image's header, backing chain, snapshots and how its clusters are stored") { image, backing, snapshot };
        command.SetAction(r =>
        {
            using var t = new Qcow2Target(r.GetValue(image)!, new Qcow2OpenOptions { BackingFile = r.GetValue(backing), Snapshot = r.GetValue(snapshot) });
            Print(t);
            return 0;
        });
        return command;
    }

    private static void Print(Qcow2Target t)
    {
        var i = CultureInfo.InvariantCulture;
        var h = t.Header;
        void Line(FormattableString s) => Console.WriteLine(s.ToString(i));
        Line($"image             {t.Path}");
        Line($"version           {h.Version}{(h.Version == 2 ? " (compat 0.10)" : " (compat 1.1)")}");
        Line($"virtual size      {h.Size} bytes");
        Line($"cluster size      {h.ClusterSize} bytes (cluster_bits {h.ClusterBits})");
        Line($"refcount order    {h.RefcountOrder} ({1 << Math.Min(h.RefcountOrder, 6)}-bit refcounts)");
        Line($"compression type  {Qcow2Header.CompressionName(h.CompressionType)}");
        Line($"extended l2       {(h.ExtendedL2 ? "yes (32 subclusters per cluster)" : "no")}");
        var features = h.FeatureList().ToList();
        Line($"features          {(features.Count == 0 ? "none" : string.Join(", ", features))}");
        Line($"backing file      {h.BackingFile ?? "none"}{(h.BackingFormat is { } f ? $" (format {f})" : h.BackingFile is null ? "" : " (format not recorded: probed)")}");
        var chain = t.Chain;
        if (chain.Count > 1)
        {
            Console.WriteLine("backing chain");
            for (var depth = 0; depth < chain.Count; depth++)
            {
                var (path, format, size) = chain[depth];
                Line($"  {depth}  {format,-5}  {size,14} bytes  {path}");
            }
        }
        Line($"snapshots         {t.Snapshots.Count}");
        foreach (var s in t.Snapshots)
        {
            Line($"  id {s.Id,-4} {s.Name,-20} {s.DiskSize,14} bytes  {s.Date:yyyy-MM-dd HH:mm:ss} UTC  vm state {s.VmStateSize} bytes");
        }
        var (data, zero, compressed, unallocated, corrupt) = t.CountClusters();
        var total = data + zero + compressed + unallocated + corrupt;
        string Share(long n) => total == 0 ? "0%" : (100.0 * n / total).ToString("0.##", i) + "%";
        Line($"clusters          {total}{(t.Snapshot is { } snap ? $" (snapshot {snap.Id} '{snap.Name}')" : "")}");
        Line($"  allocated       {data} ({Share(data)})");
        Line($"  zero            {zero} ({Share(zero)})");
        Line($"  compressed      {compressed} ({Share(compressed)})");
        Line($"  unallocated     {unallocated} ({Share(unallocated)})");
        if (corrupt > 0)
        {
            Line($"  unreadable      {corrupt} (their L2 table is unaligned or outside the file)");
        }
    }
}
