using System.Text.Json;
using System.Text.RegularExpressions;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>Devices served by CLI daemons (`ublksharp add`), and what can be seen of them from outside.</summary>
internal static partial class CliDevices
{
    /// <summary>`ublksharp add ARGS`, which must succeed; returns the /dev/ublkbN it printed.</summary>
    public static string Add(string args)
    {
        var (code, output) = VmEnvironment.RunCli("add " + args);
        Assert.True(code == 0, $"add {args} exited {code}:\n{output}\n{DaemonLogs()}");
        var match = BlockPathRegex().Match(output);
        Assert.True(match.Success, $"add {args} printed no /dev/ublkbN:\n{output}");
        Assert.True(File.Exists(match.Value), $"add {args} printed {match.Value}, which does not exist");
        return match.Value;
    }

    public static uint IdOf(string blockPath) => uint.Parse(blockPath.AsSpan("/dev/ublkb".Length), System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>`ublksharp del -n ID`, which must succeed; afterwards the kernel has no such device.</summary>
    public static void Del(uint id)
    {
        var (code, output) = VmEnvironment.RunCli($"del -n {id}");
        Assert.True(code == 0, $"del -n {id} exited {code}:\n{output}");
        Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(10)),
            $"device {id} still exists after del: {string.Join(' ', VmEnvironment.DeviceIds())}");
    }

    /// <summary>`ublksharp list --json`, as id to the row's JSON.</summary>
    public static Dictionary<uint, JsonElement> List()
    {
        var (code, stdout, stderr) = VmEnvironment.Exec(VmEnvironment.Cli, ["list", "--json"], TimeSpan.FromMinutes(1));
        Assert.True(code == 0, $"list --json exited {code}:\n{stdout}{stderr}");
        using var doc = JsonDocument.Parse(stdout);
        return doc.RootElement.EnumerateArray().ToDictionary(e => e.GetProperty("id").GetUInt32(), e => e.Clone());
    }

    /// <summary>The pid of the daemon serving device <paramref name="id"/>, as the kernel reports it (GET_DEV_INFO).</summary>
    public static int DaemonPid(uint id)
    {
        using var control = ControlDevice.Open();
        var pid = control.GetDeviceInfo(id).ublksrv_pid;
        Assert.True(pid > 0, $"device {id} has no daemon pid ({pid})");
        return pid;
    }

    /// <summary>The state of device <paramref name="id"/>, as the kernel reports it (GET_DEV_INFO).</summary>
    public static DeviceState State(uint id)
    {
        using var control = ControlDevice.Open();
        return (DeviceState)control.GetDeviceInfo(id).state;
    }

    /// <summary>
    /// Unmounts what the test mounted, then deletes every ublk device. For finally blocks: it never
    /// throws (nor asserts), so the test's own failure is the one reported.
    /// </summary>
    public static void CleanUp(params string[] mountPoints)
    {
        try
        {
            foreach (var mnt in mountPoints)
            {
                if (VmEnvironment.IsMounted(mnt))
                {
                    VmEnvironment.Exec("umount", [mnt], TimeSpan.FromMinutes(1));
                }
                if (VmEnvironment.IsMounted(mnt))
                {
                    VmEnvironment.Exec("umount", ["-l", mnt], TimeSpan.FromMinutes(1));
                }
            }
            if (VmEnvironment.DeviceIds().Length > 0)
            {
                VmEnvironment.RunCli("del --all");
            }
        }
#pragma warning disable CA1031 // cleanup must not hide the test's failure
        catch (Exception e)
#pragma warning restore CA1031
        {
            VmEnvironment.Log($"cleanup: {e.Message}");
        }
    }

    /// <summary>The daemons' logs written since <paramref name="since"/> (all of them by default), for failure messages.</summary>
    public static string DaemonLogs(DateTime? since = null)
    {
        var dir = Path.Combine(DeviceRecord.Directory, "logs");
        if (!Directory.Exists(dir))
        {
            return "(no daemon logs)";
        }
        var logs = new DirectoryInfo(dir).GetFiles("*.log")
            .Where(f => f.LastWriteTimeUtc >= (since ?? DateTime.MinValue))
            .OrderBy(f => f.LastWriteTimeUtc)
            .TakeLast(3)
            .Select(f => $"--- {f.Name}\n{string.Join('\n', File.ReadLines(f.FullName).TakeLast(20))}");
        return string.Join('\n', logs);
    }

    /// <summary>
    /// CPU time in nanoseconds (the first field of schedstat) of each queue thread (named ublk-qN) of
    /// process <paramref name="pid"/>: an idle queue thread sleeps in one io_uring_enter and gains none,
    /// and a busy one gains it whether or not it ever sleeps (a queue kept full may reap completions
    /// without waiting: CI saw one gain a single voluntary switch over 3,500 requests).
    /// </summary>
    public static Dictionary<string, long> QueueThreadCpu(int pid)
    {
        var result = new Dictionary<string, long>();
        foreach (var task in Directory.GetDirectories($"/proc/{pid}/task"))
        {
            try
            {
                var name = File.ReadAllText(Path.Combine(task, "comm")).Trim();
                if (!name.StartsWith("ublk-q", StringComparison.Ordinal))
                {
                    continue;
                }
                var fields = File.ReadAllText(Path.Combine(task, "schedstat")).Split(' ', StringSplitOptions.RemoveEmptyEntries);
                result[name] = long.Parse(fields[0], System.Globalization.CultureInfo.InvariantCulture);
            }
            catch (IOException)
            {
            }
        }
        return result;
    }

    /// <summary>Asserts that each of the <paramref name="queues"/> queue threads served IO between two samples of <see cref="QueueThreadCpu"/>.</summary>
    /// <remarks>
    /// An idle queue thread gains no CPU time at all; serving even a hundred requests under TCG costs
    /// tens of milliseconds, so 2 ms is a bar only a thread that served IO passes.
    /// </remarks>
    public static void AssertEveryQueueServed(int queues, Dictionary<string, long> before, Dictionary<string, long> after, long atLeastNs = 2_000_000)
    {
        var detail = string.Join(", ", after.OrderBy(kv => kv.Key, StringComparer.Ordinal)
            .Select(kv => $"{kv.Key}: {(kv.Value - before.GetValueOrDefault(kv.Key)) / 1e6:F1} ms"));
        Assert.True(after.Count == queues, $"expected {queues} queue threads (ublk-qN), found {after.Count}: {detail}");
        foreach (var (name, ns) in after)
        {
            Assert.True(ns - before.GetValueOrDefault(name) >= atLeastNs, $"queue thread {name} served (almost) no IO; CPU time gained: {detail}");
        }
        VmEnvironment.Log($"queue threads' CPU time: {detail}");
    }

    [GeneratedRegex(@"/dev/ublkb\d+")]
    private static partial Regex BlockPathRegex();
}
