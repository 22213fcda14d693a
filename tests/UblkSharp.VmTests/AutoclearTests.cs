using System.Diagnostics;
using System.Text.RegularExpressions;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.VmTests;

/// <summary>
/// Autoclear, loop's lesson applied to ublk: a device that was mounted deletes itself when its last
/// mount goes, and a udev-like reader that opens, reads and closes every /dev/ublkb* throughout
/// never sees a half-torn device. 200 add → mount → write → umount cycles in-process with the
/// library (a CLI cycle costs seconds under TCG), and 5 through `ublksharp mount` and `umount`.
/// </summary>
public partial class AutoclearTests
{
    private const string Image = "/tmp/ublksharp-autoclear.img";
    private const string Mnt = "/tmp/ublksharp-autoclear";
    private const int InProcessCycles = 200;

    private static readonly int[] GoneErrnos = [Errno.ENOENT, Errno.ENXIO, Errno.ENODEV];

    private static void MakeFileSystemImage()
    {
        Lifecycle.CreateImage(Image, 32 << 20);
        VmEnvironment.ShOk($"mkfs.ext4 -q -F -E nodiscard {Image}");
        Directory.CreateDirectory(Mnt);
    }

    private static string Content(int cycle) => $"cycle {cycle}: {new string((char)('a' + (cycle % 26)), 1000 + cycle)}\n";

    /// <summary>Checks the previous cycle's file (written through another device) and writes this cycle's.</summary>
    private static void WriteAndCheck(int cycle)
    {
        if (cycle > 0)
        {
            var previous = Path.Combine(Mnt, $"cycle-{cycle - 1}.txt");
            Assert.True(File.Exists(previous), $"cycle {cycle}: {previous} is missing");
            Assert.Equal(Content(cycle - 1), File.ReadAllText(previous));
        }
        File.WriteAllText(Path.Combine(Mnt, $"cycle-{cycle}.txt"), Content(cycle));
    }

    private static void AssertReaderSawNoHalfTornDevice(AutoclearReader reader)
    {
        Assert.True(reader.Stop(TimeSpan.FromSeconds(30)), $"the udev-like reader hung in a read: {reader.Summary}");
        VmEnvironment.Figure($"udev-like reader: {reader.Summary}");
        Assert.True(reader.HalfTorn.Length == 0, $"the reader saw {reader.HalfTorn.Length} half-torn devices:\n{string.Join('\n', reader.HalfTorn.Take(20))}");
        Assert.True(reader.OpenErrors.Keys.All(GoneErrnos.Contains), $"opens failed other than with ENOENT/ENXIO/ENODEV: {reader.Summary}");
        Assert.True(reader.Reads > 0, $"the reader never read a device: {reader.Summary}");
    }

    [Fact]
    public void TwoHundredInProcessCyclesWithAConcurrentReader()
    {
        VmEnvironment.RequireDriver();
        MakeFileSystemImage();
        var devices = VmEnvironment.DeviceIds();
        var reader = new AutoclearReader();
        try
        {
            var times = new List<double>();
            Cycle(0);
            var before = Resources.Sample();
            var total = Stopwatch.StartNew();
            for (var i = 1; i <= InProcessCycles; i++)
            {
                var sw = Stopwatch.StartNew();
                Cycle(i);
                times.Add(sw.Elapsed.TotalSeconds);
            }
            total.Stop();
            AssertReaderSawNoHalfTornDevice(reader);
            VmEnvironment.Figure($"{InProcessCycles} in-process autoclear cycles (+1 warm-up), 0 failed mounts, in {Lifecycle.Seconds(total.Elapsed)}: " +
                $"cycle median {Lifecycle.Seconds(Lifecycle.Median(times))}, max {Lifecycle.Seconds(times.Max())}");

            Resources after = default!;
            VmEnvironment.WaitFor(() => (after = Resources.Sample()).SameAs(before), TimeSpan.FromSeconds(15));
            VmEnvironment.Log($"before: {before}\nafter:  {after}");
            Assert.True(after.SameAs(before), $"resources leaked:\nbefore: {before}\nafter:  {after}");
            Assert.Equal(devices, VmEnvironment.DeviceIds());
            Assert.Empty(VmEnvironment.BlockNodes().Except(devices.Select(d => $"/dev/ublkb{d}")));
            // Every cycle's file is there: the image holds a clean file system.
            VmEnvironment.ShOk($"e2fsck -fn {Image}");
        }
        finally
        {
            reader.Dispose();
            if (VmEnvironment.IsMounted(Mnt))
            {
                VmEnvironment.Exec("umount", ["-l", Mnt], TimeSpan.FromMinutes(1));
            }
            File.Delete(Image);
        }
    }

    /// <summary>One cycle as a daemon with autoclear runs it: create, watch, mount, write, umount; the watcher deletes the device.</summary>
    private static void Cycle(int cycle)
    {
        using var target = new LoopTarget(Image);
        Exception? fatal = null;
        var device = UblkDevice.Create(target, new DeviceOptions { Queues = 1, Depth = 32 }, e => fatal = e);
        var path = device.BlockPath;
        var id = device.Id;
        var stop = false;
        var deleted = false;
        var left = -1;
        Exception? error = null;
        var autoclear = new Autoclear(path);
        var phase = "not started";
        var watcher = new Thread(() =>
        {
            try
            {
                phase = "waiting for the mount to come and go";
                if (autoclear.WaitUntilReleased(() => Volatile.Read(ref stop)))
                {
                    phase = "retiring (waiting for openers to go)";
                    left = autoclear.Retire(TimeSpan.FromSeconds(30));
                    phase = "disposing";
                    device.Dispose();
                    deleted = true;
                    phase = "done";
                }
            }
#pragma warning disable CA1031 // reported by the test thread
            catch (Exception e)
#pragma warning restore CA1031
            {
                error = e;
            }
        })
        { IsBackground = true, Name = "autoclear" };
        watcher.Start();
        try
        {
            Lifecycle.Mount(path, Mnt);
            WriteAndCheck(cycle);
            Lifecycle.Umount(Mnt);
            if (!watcher.Join(TimeSpan.FromSeconds(60)))
            {
                var mounts = File.ReadAllLines("/proc/self/mountinfo").Where(l => l.Contains(Path.GetFileName(path), StringComparison.Ordinal) || l.Contains(Mnt, StringComparison.Ordinal));
                Assert.Fail($"cycle {cycle}: autoclear did not delete {path} within 60 s of umount; its watcher is {Volatile.Read(ref phase)}; " +
                    $"{path} exists: {File.Exists(path)}; mount table lines for it: [{string.Join("; ", mounts)}]");
            }
            Assert.Null(error);
            Assert.True(deleted, $"cycle {cycle}: autoclear ended without deleting {path}");
            Assert.True(left == 0, $"cycle {cycle}: {left} openers still held {path} when autoclear stopped it");
            Assert.False(File.Exists(path), $"cycle {cycle}: {path} outlived autoclear");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(10)),
                $"cycle {cycle}: device {id} still exists after autoclear deleted it");
            Assert.Null(fatal);
        }
        finally
        {
            if (VmEnvironment.IsMounted(Mnt))
            {
                VmEnvironment.Exec("umount", ["-l", Mnt], TimeSpan.FromMinutes(1));
            }
            Volatile.Write(ref stop, true);
            if (watcher.Join(TimeSpan.FromSeconds(60)) && !deleted)
            {
                device.Dispose();
            }
        }
    }

    [Fact]
    [Trait("kernel", "7.3")]
    public void FiveCliMountCyclesLeaveNothingBehind()
    {
        VmEnvironment.RequireDriver();
        MakeFileSystemImage();
        var devices = VmEnvironment.DeviceIds();
        Assert.Empty(VmEnvironment.CliProcesses());
        var reader = new AutoclearReader();
        try
        {
            for (var i = 0; i < 5; i++)
            {
                var sw = Stopwatch.StartNew();
                var (code, output) = VmEnvironment.RunCli($"mount {Image} {Mnt}", TimeSpan.FromMinutes(2));
                Assert.True(code == 0, $"cycle {i}: ublksharp mount exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
                var mounted = sw.Elapsed;
                var path = BlockPathRegex().Match(output).Value;
                Assert.True(path.Length > 0, $"cycle {i}: ublksharp mount printed no device:\n{output}");
                Assert.True(VmEnvironment.IsMounted(Mnt), $"cycle {i}: {Mnt} is not mounted after ublksharp mount");
                var id = CliDevices.IdOf(path);
                var pid = Lifecycle.DaemonPid(id);
                WriteAndCheck(i);
                sw.Restart();
                Lifecycle.Umount(Mnt);
                var gone = VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id) && !File.Exists(path) && !Processes.IsAlive(pid)
                    && VmEnvironment.CliProcesses().Length == 0, TimeSpan.FromSeconds(60));
                Assert.True(gone, $"cycle {i}: 60 s after umount: device {id} exists: {VmEnvironment.DeviceIds().Contains(id)}, {path} exists: {File.Exists(path)}, " +
                    $"daemon {pid} alive: {Processes.IsAlive(pid)}, CLI processes: {string.Join(' ', VmEnvironment.CliProcesses())}\n{CliDevices.DaemonLogs()}");
                Assert.False(File.Exists(DeviceRecord.PathFor(id)), $"cycle {i}: the device record outlived the device");
                VmEnvironment.Log($"cli cycle {i}: device {id} mounted in {Lifecycle.Seconds(mounted)}, gone {Lifecycle.Seconds(sw.Elapsed)} after umount");
            }
            AssertReaderSawNoHalfTornDevice(reader);
            Assert.Equal(devices, VmEnvironment.DeviceIds());
            VmEnvironment.ShOk($"e2fsck -fn {Image}");
        }
        finally
        {
            reader.Dispose();
            Lifecycle.CleanUp(Mnt);
            File.Delete(Image);
        }
    }

    /// <summary>
    /// `ublksharp mount` of each file system a user is likely to have in an image. btrfs is the
    /// one that matters: its superblock's st_dev is anonymous (0:NN), so only the mount source in
    /// mountinfo says that /dev/ublkbN is mounted; the device once outlived its umount.
    /// </summary>
    [Theory]
    [InlineData("ext4", "mkfs.ext4 -q -F -E nodiscard", "e2fsck -fn")]
    [InlineData("xfs", "mkfs.xfs -q -f -K", "xfs_repair -n -f")]
    [InlineData("btrfs", "mkfs.btrfs -q -f -K", "btrfs check --readonly")]
    public void CliMountOfEachFileSystemClearsOnUmount(string fsType, string mkfs, string fsck)
    {
        VmEnvironment.RequireDriver();
        var image = $"/tmp/ublksharp-autoclear-{fsType}.img";
        var mnt = $"/tmp/ublksharp-autoclear-{fsType}";
        // 320 MiB (sparse): xfs refuses file systems under 300 MiB.
        Lifecycle.CreateImage(image, 320 << 20);
        Directory.CreateDirectory(mnt);
        try
        {
            VmEnvironment.ShOk($"{mkfs} {image}");
            // Generous: two dotnet starts (the CLI and its daemon) take minutes on a loaded host under TCG.
            var (code, output) = VmEnvironment.RunCli($"mount {image} {mnt}", TimeSpan.FromMinutes(6));
            Assert.True(code == 0, $"{fsType}: ublksharp mount exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
            var path = BlockPathRegex().Match(output).Value;
            Assert.True(path.Length > 0, $"{fsType}: ublksharp mount printed no device:\n{output}");
            var line = File.ReadLines("/proc/self/mountinfo").FirstOrDefault(l => MountInfo.Parse(l)?.MountPoint == mnt);
            Assert.True(line is not null, $"{fsType}: {mnt} is not in the mount table after ublksharp mount");
            Assert.Equal(fsType, MountInfo.Parse(line)!.Value.FsType);
            VmEnvironment.Log($"{fsType}: {line}");
            var id = CliDevices.IdOf(path);
            var pid = Lifecycle.DaemonPid(id);
            var content = $"written through {path} on {fsType}\n";
            File.WriteAllText(Path.Combine(mnt, "file.txt"), content);

            var sw = Stopwatch.StartNew();
            Lifecycle.Umount(mnt);
            var gone = VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id) && !File.Exists(path) && !Processes.IsAlive(pid), TimeSpan.FromSeconds(60));
            Assert.True(gone, $"{fsType}: 60 s after umount: device {id} exists: {VmEnvironment.DeviceIds().Contains(id)}, {path} exists: {File.Exists(path)}, " +
                $"daemon {pid} alive: {Processes.IsAlive(pid)}\n{CliDevices.DaemonLogs()}");
            VmEnvironment.Figure($"ublksharp mount of {fsType}: device {id} gone {Lifecycle.Seconds(sw.Elapsed)} after umount");

            VmEnvironment.ShOk($"{fsck} {image}");
            // The file reached the image: mounted again (by the kernel's loop driver, read-only), it is there.
            VmEnvironment.ShOk($"mount -o loop,ro -t {fsType} {image} {mnt}");
            try
            {
                Assert.Equal(content, File.ReadAllText(Path.Combine(mnt, "file.txt")));
            }
            finally
            {
                Lifecycle.Umount(mnt);
            }
        }
        finally
        {
            Lifecycle.CleanUp(mnt);
            File.Delete(image);
        }
    }

    [GeneratedRegex(@"/dev/ublkb\d+")]
    private static partial Regex BlockPathRegex();

    /// <summary>What this process holds that a device could leak: threads (queue threads by name), fds (ublk ones by name), ublkc mappings.</summary>
    private sealed record Resources(int Threads, int QueueThreads, int Fds, int UblkFds, int CharMappings)
    {
        public static Resources Sample()
        {
            int threads = 0, queueThreads = 0, fds = 0, ublkFds = 0;
            foreach (var task in Directory.GetDirectories("/proc/self/task"))
            {
                try
                {
                    queueThreads += File.ReadAllText(Path.Combine(task, "comm")).StartsWith("ublk-q", StringComparison.Ordinal) ? 1 : 0;
                    threads++;
                }
                catch (IOException)
                {
                }
            }
            foreach (var fd in Directory.GetFiles("/proc/self/fd"))
            {
                try
                {
                    ublkFds += new FileInfo(fd).LinkTarget?.StartsWith("/dev/ublk", StringComparison.Ordinal) == true ? 1 : 0;
                    fds++;
                }
                catch (IOException)
                {
                }
            }
            var mappings = File.ReadLines("/proc/self/maps").Count(l => l.Contains("/dev/ublkc", StringComparison.Ordinal));
            return new Resources(threads, queueThreads, fds, ublkFds, mappings);
        }

        // Slack for the runtime's own thread-pool threads and the enumeration's fd; a leak of one per cycle shows as 200.
        public bool SameAs(Resources before) => Threads <= before.Threads + 4 && Fds <= before.Fds + 4
            && QueueThreads == 0 && UblkFds == 0 && CharMappings == 0;

        public override string ToString() => $"{Threads} threads ({QueueThreads} ublk-q), {Fds} fds ({UblkFds} /dev/ublk*), {CharMappings} ublkc mappings";
    }
}
