using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// What the device lifecycle tests (recovery, autoclear, teardown) share: the kernel's view of a
/// device read in-process (a CLI call costs seconds under TCG), kill -9 of a daemon, bounded waits,
/// and a cleanup that leaves no device, mount or daemon behind whatever state a test stopped in.
/// </summary>
internal static class Lifecycle
{
    public static void CreateImage(string path, long bytes)
    {
        using var f = File.Create(path);
        f.SetLength(bytes);
    }

    /// <summary>The kernel's info of device <paramref name="id"/>, or null if it has none.</summary>
    public static DevInfo? Info(uint id)
    {
        using var control = ControlDevice.Open();
        try
        {
            return control.GetDeviceInfo(id);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            return null;
        }
    }

    public static DeviceState? State(uint id) => Info(id) is { } info ? (DeviceState)info.state : null;

    /// <summary>The pid of the daemon serving device <paramref name="id"/>, as the kernel has it.</summary>
    public static int DaemonPid(uint id)
    {
        var info = Info(id);
        Assert.True(info is not null, $"device {id} does not exist");
        Assert.True(info.Value.ublksrv_pid > 0, $"device {id} has no daemon (pid {info.Value.ublksrv_pid})");
        return info.Value.ublksrv_pid;
    }

    /// <summary>Waits until device <paramref name="id"/> is in <paramref name="state"/>; fails the test on timeout.</summary>
    public static void WaitForState(uint id, DeviceState state, TimeSpan timeout)
    {
        DeviceState? last = null;
        Assert.True(VmEnvironment.WaitFor(() => (last = State(id)) == state, timeout),
            $"device {id} did not become {state} within {timeout.TotalSeconds} s (it is {last?.ToString() ?? "gone"})");
    }

    /// <summary>Waits until device <paramref name="id"/> is LIVE with a daemon other than <paramref name="oldPid"/>; returns its pid.</summary>
    public static int WaitForNewDaemon(uint id, int oldPid, TimeSpan timeout)
    {
        DevInfo? info = null;
        var ok = PollFor(() => (info = Info(id)) is { } i && (DeviceState)i.state == DeviceState.Live && i.ublksrv_pid != oldPid && i.ublksrv_pid > 0, timeout);
        Assert.True(ok, $"device {id} was not live with a new daemon within {timeout.TotalSeconds} s (state {(info is { } x ? $"{(DeviceState)x.state}, pid {x.ublksrv_pid}" : "gone")})\n{CliDevices.DaemonLogs()}");
        return info!.Value.ublksrv_pid;
    }

    /// <summary>As <see cref="VmEnvironment.WaitFor"/>, but polling every 5 ms (for timings).</summary>
    public static bool PollFor(Func<bool> condition, TimeSpan timeout)
    {
        var deadline = Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        while (!condition())
        {
            if (Stopwatch.GetTimestamp() > deadline)
            {
                return condition();
            }
            Thread.Sleep(5);
        }
        return true;
    }

    /// <summary>Completed reads and writes of a block device so far (/sys/block/NAME/stat); (-1, -1) once it is gone.</summary>
    public static (long Reads, long Writes) IoCounts(string blockPath)
    {
        try
        {
            var f = File.ReadAllText($"/sys/block/{Path.GetFileName(blockPath)}/stat").Split(' ', StringSplitOptions.RemoveEmptyEntries);
            return (long.Parse(f[0], CultureInfo.InvariantCulture), long.Parse(f[4], CultureInfo.InvariantCulture));
        }
        catch (IOException)
        {
            return (-1, -1);
        }
    }

    /// <summary>
    /// Waits until the device has completed <paramref name="writes"/> writes, so that a load started
    /// in <paramref name="load"/> is really running; fails if the load ends first or nothing moves.
    /// </summary>
    public static long WaitForWrites(string blockPath, long writes, Task load, TimeSpan timeout)
    {
        long seen = 0;
        var ok = PollFor(() => load.IsCompleted || (seen = IoCounts(blockPath).Writes) >= writes, timeout);
        Assert.False(load.IsCompleted && seen < writes, $"the load ended after {seen} writes, before the {writes} to wait for: {load.Exception?.InnerException?.Message}");
        Assert.True(ok, $"{blockPath} completed only {seen} of {writes} writes within {timeout.TotalSeconds} s");
        return seen;
    }

    /// <summary>kill -9, then waits until the process is gone (reaped).</summary>
    public static void Kill9(int pid)
    {
        Assert.True(Processes.Signal(pid, Processes.SIGKILL), $"kill -9 {pid} failed: it is not running");
        Assert.True(PollFor(() => !Processes.IsAlive(pid), TimeSpan.FromSeconds(20)), $"pid {pid} outlived kill -9 by 20 s");
    }

    /// <summary>
    /// The pid of a supervisor's warm spare (a `recover --standby` process) other than
    /// <paramref name="notPid"/> that has finished starting: its CPU time stands still for a second
    /// (it waits on stdin for the word). Null if none is ready within <paramref name="timeout"/>.
    /// </summary>
    public static int? WaitForIdleSpare(int notPid, TimeSpan timeout)
    {
        var deadline = Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        while (Stopwatch.GetTimestamp() < deadline)
        {
            foreach (var pid in VmEnvironment.CliProcesses().Where(p => p != notPid && CommandLine(p).Contains("--standby", StringComparison.Ordinal)))
            {
                var before = CpuTicks(pid);
                Thread.Sleep(1000);
                if (before >= 0 && CpuTicks(pid) == before)
                {
                    return pid;
                }
            }
            Thread.Sleep(100);
        }
        return null;
    }

    private static string CommandLine(int pid)
    {
        try
        {
            return File.ReadAllText($"/proc/{pid}/cmdline").Replace('\0', ' ');
        }
        catch (IOException)
        {
            return "";
        }
    }

    // utime + stime of a process (/proc/PID/stat fields 14 and 15), or -1 once it is gone.
    private static long CpuTicks(int pid)
    {
        try
        {
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            var f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture);
        }
        catch (IOException)
        {
            return -1;
        }
    }

    /// <summary>`ublksharp recover -n ID`, which must succeed within a bound; returns how long it took.</summary>
    public static TimeSpan Recover(uint id)
    {
        var sw = Stopwatch.StartNew();
        var (code, output) = VmEnvironment.RunCli($"recover -n {id}", TimeSpan.FromMinutes(2));
        sw.Stop();
        Assert.True(code == 0, $"recover -n {id} exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
        Assert.Contains($"/dev/ublkb{id}", output, StringComparison.Ordinal);
        return sw.Elapsed;
    }

    /// <summary>
    /// A CLI command that must be refused: a non-zero exit within the bound, one clear line (no stack
    /// trace) containing each of <paramref name="fragments"/>. Returns the output.
    /// </summary>
    public static string AssertRefused(string args, params string[] fragments)
    {
        var (code, output) = VmEnvironment.RunCli(args, TimeSpan.FromMinutes(2));
        VmEnvironment.Log($"ublksharp {args}: exit {code}: {output.Trim()}");
        Assert.True(code != 0, $"`ublksharp {args}` was not refused (exit 0):\n{output}");
        foreach (var f in fragments)
        {
            Assert.True(output.Contains(f, StringComparison.OrdinalIgnoreCase), $"`ublksharp {args}` said no without '{f}':\n{output}");
        }
        Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
        return output;
    }

    /// <summary>Mounts <paramref name="device"/> (ext4) at <paramref name="dir"/>; the mount must succeed.</summary>
    public static void Mount(string device, string dir)
    {
        Directory.CreateDirectory(dir);
        var (code, stdout, stderr) = VmEnvironment.Exec("mount", [device, dir], TimeSpan.FromMinutes(1));
        Assert.True(code == 0, $"mount {device} {dir} exited {code}: {stdout}{stderr}");
    }

    public static void Umount(string dir)
    {
        var (code, stdout, stderr) = VmEnvironment.Exec("umount", [dir], TimeSpan.FromMinutes(1));
        Assert.True(code == 0, $"umount {dir} exited {code}: {stdout}{stderr}");
    }

    /// <summary>
    /// For finally blocks, never throws: unmounts <paramref name="mountPoints"/>, deletes every ublk
    /// device (forced), kills any CLI process left (daemons, supervisors) and deletes again.
    /// </summary>
    public static void CleanUp(params string[] mountPoints)
    {
        try
        {
            foreach (var mnt in mountPoints)
            {
                for (var i = 0; i < 2 && VmEnvironment.IsMounted(mnt); i++)
                {
                    VmEnvironment.Exec("umount", i == 0 ? [mnt] : ["-l", mnt], TimeSpan.FromMinutes(1));
                }
            }
            DeleteDevicesOfOtherProcesses();
            var left = VmEnvironment.CliProcesses();
            if (left.Length > 0)
            {
                VmEnvironment.Log($"cleanup: killing CLI processes left behind: {string.Join(' ', left)}");
                foreach (var pid in left)
                {
                    Processes.Signal(pid, Processes.SIGKILL);
                }
                VmEnvironment.WaitFor(() => left.All(p => !Processes.IsAlive(p)), TimeSpan.FromSeconds(20));
                DeleteDevicesOfOtherProcesses();
            }
        }
#pragma warning disable CA1031 // cleanup must not hide the test's failure
        catch (Exception e)
#pragma warning restore CA1031
        {
            VmEnvironment.Log($"cleanup: {e.Message}");
        }
    }

    // `del` ends a daemon that does not exit after the stop with SIGKILL: it must never be given a
    // device this (test) process serves in-process.
    private static void DeleteDevicesOfOtherProcesses()
    {
        var ids = VmEnvironment.DeviceIds();
        var others = ids.Where(id => Info(id) is not { } info || info.ublksrv_pid != Environment.ProcessId).ToArray();
        if (others.Length == 0)
        {
            return;
        }
        if (others.Length == ids.Length)
        {
            VmEnvironment.RunCli("del --all --force", TimeSpan.FromMinutes(2));
            return;
        }
        foreach (var id in others)
        {
            VmEnvironment.RunCli($"del -n {id} --force", TimeSpan.FromMinutes(2));
        }
    }

    public static string Seconds(TimeSpan t) => t.TotalSeconds.ToString("0.00", CultureInfo.InvariantCulture) + " s";

    public static string Seconds(double s) => s.ToString("0.00", CultureInfo.InvariantCulture) + " s";

    public static double Median(IReadOnlyList<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted.Length == 0 ? double.NaN
            : sorted.Length % 2 == 1 ? sorted[sorted.Length / 2]
            : (sorted[(sorted.Length / 2) - 1] + sorted[sorted.Length / 2]) / 2;
    }
}

/// <summary>What a fio run with --continue_on_error reported, errors included (its jobs summed by --group_reporting).</summary>
internal sealed record FioErrorRun(int ExitCode, int Error, long TotalErrors, int FirstError, long ReadIos, long WriteIos, string Output)
{
    public string Summary => $"read {ReadIos} IOs, write {WriteIos} IOs, {TotalErrors} errors (first {FirstError}), error {Error}, exit {ExitCode}";

    /// <summary>fio with the common options of <see cref="Fio"/>, --continue_on_error=io and <paramref name="options"/>.</summary>
    public static FioErrorRun Run(string device, TimeSpan timeout, params string[] options)
    {
        var json = $"/tmp/ublksharp-fio-{Guid.NewGuid():N}.json";
        try
        {
            string[] args =
            [
                "--name=ublksharp", $"--filename={device}", "--direct=1", "--ioengine=io_uring", "--iodepth=32",
                "--numjobs=2", $"--cpus_allowed=0-{Environment.ProcessorCount - 1}", "--cpus_allowed_policy=split",
                "--group_reporting", "--continue_on_error=io", "--output-format=json", $"--output={json}",
                .. options,
            ];
            var (code, stdout, stderr) = VmEnvironment.Exec("fio", args, timeout);
            var text = File.Exists(json) ? File.ReadAllText(json) : "";
            var start = text.IndexOf('{', StringComparison.Ordinal);
            Assert.True(start >= 0, $"fio {string.Join(' ', args)} exited {code} and wrote no JSON:\n{stdout}{stderr}{text}");
            using var doc = JsonDocument.Parse(text[start..]);
            var job = doc.RootElement.GetProperty("jobs")[0];
            var result = new FioErrorRun(code, job.GetProperty("error").GetInt32(),
                job.TryGetProperty("total_err", out var te) ? te.GetInt64() : 0,
                job.TryGetProperty("first_error", out var fe) ? fe.GetInt32() : 0,
                job.GetProperty("read").GetProperty("total_ios").GetInt64(), job.GetProperty("write").GetProperty("total_ios").GetInt64(),
                stdout + stderr + text[..start]);
            VmEnvironment.Log($"fio {string.Join(' ', options)}: {result.Summary}");
            return result;
        }
        finally
        {
            File.Delete(json);
        }
    }
}

/// <summary>
/// Issues 4 KiB O_DIRECT reads one at a time on its own thread and timestamps every completion,
/// to measure how long IO stalls while a device's daemon is dead and being recovered.
/// </summary>
internal sealed unsafe class IoProber : IDisposable
{
    private readonly string _device;
    private readonly long _span;
    private readonly Thread _thread;
    private readonly List<long> _completions = [];
    private readonly List<string> _errors = [];
    private volatile bool _stop;

    public IoProber(string device, long span)
    {
        _device = device;
        _span = span;
        _thread = new Thread(Loop) { IsBackground = true, Name = "io-prober" };
        _thread.Start();
    }

    public int Completions
    {
        get
        {
            lock (_completions)
            {
                return _completions.Count;
            }
        }
    }

    public string[] Errors
    {
        get
        {
            lock (_completions)
            {
                return [.. _errors];
            }
        }
    }

    /// <summary>Completions that ended after the Stopwatch timestamp <paramref name="since"/>.</summary>
    public int CompletionsAfter(long since)
    {
        lock (_completions)
        {
            return _completions.Count(c => c > since);
        }
    }

    /// <summary>
    /// The IO stall after <paramref name="since"/> (a kill): the longest time in which no read
    /// completed, counted from <paramref name="since"/> for the first completion after it.
    /// </summary>
    public TimeSpan StallAfter(long since)
    {
        lock (_completions)
        {
            var prev = since;
            long longest = 0;
            foreach (var c in _completions.Where(c => c > since))
            {
                longest = Math.Max(longest, c - prev);
                prev = c;
            }
            return Stopwatch.GetElapsedTime(0, longest);
        }
    }

    private void Loop()
    {
        var fd = -1;
        var buffer = (byte*)NativeMemory.AlignedAlloc(4096, 4096);
        try
        {
            fd = Libc.OpenOrThrow(_device, Libc.O_RDONLY | Libc.O_DIRECT);
            using var handle = new SafeFileHandle(fd, ownsHandle: false);
            var random = new Random(4242);
            var blocks = _span / 4096;
            while (!_stop)
            {
                var offset = random.NextInt64(blocks) * 4096;
                try
                {
                    var n = RandomAccess.Read(handle, new Span<byte>(buffer, 4096), offset);
                    var now = Stopwatch.GetTimestamp();
                    lock (_completions)
                    {
                        if (n == 4096)
                        {
                            _completions.Add(now);
                        }
                        else
                        {
                            _errors.Add($"read at {offset} returned {n}");
                        }
                    }
                }
                catch (IOException e)
                {
                    lock (_completions)
                    {
                        _errors.Add($"read at {offset}: {e.Message}");
                    }
                    Thread.Sleep(10);
                }
            }
        }
        catch (ErrnoException e)
        {
            lock (_completions)
            {
                _errors.Add(e.Message);
            }
        }
        finally
        {
            if (fd >= 0)
            {
                _ = Libc.close(fd);
            }
            NativeMemory.AlignedFree(buffer);
        }
    }

    /// <summary>Stops the prober; false if its read did not come back within <paramref name="timeout"/> (a hung device).</summary>
    public bool Stop(TimeSpan timeout)
    {
        _stop = true;
        return _thread.Join(timeout);
    }

    public void Dispose() => Stop(TimeSpan.FromSeconds(30));
}
