using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.VmTests;

/// <summary>
/// Creating and deleting devices again and again leaves nothing behind: no ublk device or node,
/// no thread, no file descriptor, no mapping of a char device, and no daemon process.
/// </summary>
[Trait("boot", "shared")]
public class LifecycleLeakTests
{
    [Fact]
    public void FiftyInProcessCyclesLeaveNothingBehind()
    {
        VmEnvironment.RequireDriver();
        var devices = VmEnvironment.DeviceIds();
        // One cycle first: the JIT, the thread pool and the runtime's own helpers settle in.
        Cycle(0);
        var before = Resources.Sample();
        for (var i = 1; i <= 50; i++)
        {
            Cycle(i);
        }
        // Queue threads end before Dispose returns; the kernel's io-wq workers of a closed ring may take a moment.
        Resources after = default!;
        VmEnvironment.WaitFor(() => (after = Resources.Sample()).SameAs(before), TimeSpan.FromSeconds(15));
        VmEnvironment.Log($"before: {before}\nafter:  {after}");
        Assert.Equal(devices, VmEnvironment.DeviceIds());
        Assert.Empty(VmEnvironment.BlockNodes().Except(devices.Select(d => $"/dev/ublkb{d}")));
        after.AssertSameAs(before);
    }

    private static void Cycle(int i)
    {
        using var target = new MemoryTarget(16 << 20);
        Exception? fatal = null;
        var device = UblkDevice.Create(target, new DeviceOptions { Queues = 2, Depth = 32 }, e => fatal = e);
        try
        {
            Assert.Equal(2, device.Info.nr_hw_queues);
            var data = new byte[64 << 10];
            new Random(i).NextBytes(data);
            var offset = (i % 200) * (long)data.Length;
            DirectIo.Write(device.BlockPath, offset, data);
            // The bytes went through the server into the target, and come back through the device.
            var stored = new byte[data.Length];
            Assert.Equal(data.Length, target.Read(stored, offset));
            Assert.Equal(data, stored);
            Assert.Equal(data, DirectIo.Read(device.BlockPath, offset, data.Length));
        }
        finally
        {
            device.Dispose();
        }
        Assert.Null(fatal);
        Assert.False(File.Exists(device.BlockPath), $"cycle {i}: {device.BlockPath} outlived Dispose");
    }

    [Fact]
    public void AFailedCreateLeavesNothingBehind()
    {
        VmEnvironment.RequireDriver();
        var devices = VmEnvironment.DeviceIds();
        // Settle first, as above: one good device and one failure (the first exception's stack
        // trace opens symbol files, and keeps them).
        Cycle(0);
        FailToCreate();
        var before = Resources.Sample();
        for (var i = 0; i < 5; i++)
        {
            FailToCreate();
            Assert.Equal(devices, VmEnvironment.DeviceIds());
        }
        Resources after = default!;
        VmEnvironment.WaitFor(() => (after = Resources.Sample()).SameAs(before), TimeSpan.FromSeconds(15));
        after.AssertSameAs(before);
    }

    private static void FailToCreate()
    {
        using var target = new BrokenTarget();
        var e = Assert.ThrowsAny<Exception>(() => UblkDevice.Create(target, new DeviceOptions { Queues = 2, Depth = 32 }).Dispose());
        Assert.Contains(BrokenTarget.Message, e.ToString(), StringComparison.Ordinal);
    }

    /// <summary>A target whose queue set-up fails (on the queue thread, after ADD_DEV and SET_PARAMS).</summary>
    private sealed class BrokenTarget : BlockTarget
    {
        public const string Message = "this target cannot serve a queue";

        public override long Size => 16 << 20;

        public override string Kind => "broken";

        public override int Read(Span<byte> buffer, long offset) => buffer.Length;

        public override UringBackend? CreateUringBackend(int queueId) => throw new InvalidOperationException(Message);
    }

    [Fact]
    public void FiveCliCyclesLeaveNoDaemonBehind()
    {
        VmEnvironment.RequireDriver();
        var devices = VmEnvironment.DeviceIds();
        // Compared with what ran before (a supervisor of another test's device, say), not with nothing.
        var processes = VmEnvironment.CliProcesses();
        try
        {
            for (var i = 0; i < 5; i++)
            {
                var dev = CliDevices.Add("-t mem --size 64M -q 2");
                var id = CliDevices.IdOf(dev);
                var pid = CliDevices.DaemonPid(id);
                Assert.Equal([pid], VmEnvironment.CliProcesses().Except(processes));
                var data = new byte[1 << 20];
                new Random(i).NextBytes(data);
                DirectIo.Write(dev, 1 << 20, data);
                Assert.Equal(data, DirectIo.Read(dev, 1 << 20, data.Length));

                CliDevices.Del(id);
                Assert.True(VmEnvironment.WaitFor(() => !Processes.IsAlive(pid), TimeSpan.FromSeconds(10)), $"cycle {i}: the daemon (pid {pid}) outlived del");
                Assert.Empty(VmEnvironment.CliProcesses().Except(processes));
                Assert.Equal(devices, VmEnvironment.DeviceIds());
                Assert.False(File.Exists(dev), $"cycle {i}: {dev} outlived del");
                Assert.False(File.Exists(DeviceRecord.PathFor(id)), $"cycle {i}: the device record outlived del");
            }
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    /// <summary>What this process holds that a device could leak.</summary>
    private sealed record Resources(int Threads, Dictionary<string, int> ThreadKinds, int Fds, Dictionary<string, int> FdKinds, int CharMappings, string[] FdTargets)
    {
        public static Resources Sample()
        {
            var threadKinds = new Dictionary<string, int>();
            var threads = 0;
            foreach (var task in Directory.GetDirectories("/proc/self/task"))
            {
                string name;
                try
                {
                    name = File.ReadAllText(Path.Combine(task, "comm")).Trim();
                }
                catch (IOException)
                {
                    continue; // ended while we looked
                }
                threads++;
                // ublk-qN: queue threads; iou-wrk-N / iou-sqp-N: the kernel's io_uring workers.
                var kind = name.StartsWith("ublk-q", StringComparison.Ordinal) ? "ublk-q"
                    : name.StartsWith("iou-", StringComparison.Ordinal) ? "iou" : null;
                if (kind is not null)
                {
                    threadKinds[kind] = threadKinds.GetValueOrDefault(kind) + 1;
                }
            }
            var fdKinds = new Dictionary<string, int>();
            var fdTargets = new List<string>();
            var fds = 0;
            foreach (var fd in Directory.GetFiles("/proc/self/fd"))
            {
                string? link;
                try
                {
                    link = new FileInfo(fd).LinkTarget;
                }
                catch (IOException)
                {
                    continue;
                }
                fds++;
                fdTargets.Add(link ?? "?");
                var kind = link switch
                {
                    "anon_inode:[io_uring]" or "anon_inode:[eventfd]" => link,
                    _ when link?.StartsWith("/dev/ublk", StringComparison.Ordinal) == true => link.StartsWith("/dev/ublkc", StringComparison.Ordinal) ? "/dev/ublkcN" : link,
                    _ => null,
                };
                if (kind is not null)
                {
                    fdKinds[kind] = fdKinds.GetValueOrDefault(kind) + 1;
                }
            }
            var mappings = File.ReadLines("/proc/self/maps").Count(l => l.Contains("/dev/ublkc", StringComparison.Ordinal));
            return new Resources(threads, threadKinds, fds, fdKinds, mappings, [.. fdTargets]);
        }

        // The runtime may start or retire a thread-pool thread or two, and the enumeration of
        // /proc/self/fd holds a descriptor of its own: totals get a little slack, the kinds a
        // device creates none. A leak of one per cycle shows as 50.
        public bool SameAs(Resources before) => Threads <= before.Threads + 3 && Fds <= before.Fds + 3 && CharMappings == 0
            && Same(ThreadKinds, before.ThreadKinds) && Same(FdKinds, before.FdKinds);

        public void AssertSameAs(Resources before)
        {
            if (!SameAs(before))
            {
                var added = FdTargets.GroupBy(t => t).Select(g => (g.Key, Count: g.Count() - before.FdTargets.Count(t => t == g.Key))).Where(x => x.Count > 0);
                Assert.Fail($"resources leaked:\nbefore: {before}\nafter:  {this}\nnew fds: {string.Join(", ", added.Select(x => $"{x.Key} x{x.Count}"))}");
            }
        }

        private static bool Same(Dictionary<string, int> a, Dictionary<string, int> b)
            => a.Keys.Union(b.Keys).All(k => a.GetValueOrDefault(k) == b.GetValueOrDefault(k));

        public override string ToString()
            => $"{Threads} threads ({Format(ThreadKinds)}), {Fds} fds ({Format(FdKinds)}), {CharMappings} ublkc mappings";

        private static string Format(Dictionary<string, int> d) => d.Count == 0 ? "none of interest" : string.Join(", ", d.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Key}: {kv.Value}"));
    }
}
