using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using UblkSharp.Cli.Logging;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp upgrade -n ID | --all [--binary PATH]`: a new daemon (this build, or PATH) takes a
/// live device over while its IO waits in the kernel, and the old daemon exits. The new daemon is
/// started and warmed up first; only then is the old one asked to hand over (<see cref="UblkDevice.HandOver"/>),
/// and the new one recovers the device (START/END_USER_RECOVERY). If the new daemon cannot start,
/// the old one keeps serving. The device node and its major:minor never change. A supervised device
/// gets a new supervisor (<see cref="Supervisor.RunTakeover"/>) whose first daemon is the new one;
/// the old supervisor ends with its daemon's clean exit.
/// </summary>
internal static class UpgradeCommand
{
    private static readonly TimeSpan WarmTimeout = TimeSpan.FromMinutes(3);
    private static readonly TimeSpan HandOverTimeout = TimeSpan.FromSeconds(60);

    public static Command Create()
    {
        var number = new Option<int?>("--number", "-n") { Description = "The device id" };
        var all = new Option<bool>("--all") { Description = "Every device a live daemon serves" };
        var binary = new Option<string?>("--binary") { Description = "The new daemon's build: a UblkSharp.Cli.dll or an executable (default: this one)" };
        var command = new Command("upgrade", "Hand a live device over to a new daemon (this build, or --binary) with no failed IO") { number, all, binary };
        command.SetAction(r =>
        {
            var n = r.GetValue(number);
            if (n is null == !r.GetValue(all))
            {
                throw new ArgumentException("give either -n ID or --all");
            }
            if (n < 0)
            {
                throw new ArgumentException($"bad device id {n}");
            }
            var path = r.GetValue(binary);
            if (path is not null)
            {
                path = Path.GetFullPath(path);
                if (!File.Exists(path))
                {
                    throw new ArgumentException($"--binary {path}: no such file");
                }
            }
            Preflight.RequireDriver();
            if (n is int one)
            {
                Upgrade((uint)one, path);
                return 0;
            }
            var failed = 0;
            foreach (var id in DeviceList.Ids())
            {
                var record = DeviceRecord.Load(id);
                if (record is null || !Processes.IsAlive(record.Pid))
                {
                    continue;
                }
                try
                {
                    Upgrade(id, path);
                }
                catch (Exception e) when (CliErrors.IsExpected(e))
                {
                    CliLog.Error($"{CliErrors.Describe(e)}");
                    failed++;
                }
            }
            return failed == 0 ? 0 : CliErrors.Failure;
        });
        return command;
    }

    private static void Upgrade(uint id, string? binary)
    {
        var info = CurrentInfo(id);
        var record = DeviceRecord.Load(id) ?? throw new ArgumentException($"device {id}: no record in {DeviceRecord.Directory}: only a device a ublksharp daemon serves can be upgraded");
        var daemon = Check(id, info, record);
        var idText = id.ToString(CultureInfo.InvariantCulture);
        var log = DaemonLauncher.NewLog("upgrade");
        var warm = Path.Combine(DeviceRecord.Directory, $"warm-{Guid.NewGuid():N}");
        var ready = Path.Combine(DeviceRecord.Directory, $"ready-{Guid.NewGuid():N}");
        // A supervised device gets a new supervisor too (of the new build), whose first daemon is the standby.
        var supervised = record.SupervisorPid != 0 && Processes.IsAlive(record.SupervisorPid);
        string[] args = ["recover", "-n", idText, "--foreground", "--standby", "--warm-file", warm, "--ready-file", ready, .. supervised ? (string[])["--supervise"] : []];
        var start = binary is null ? DaemonLauncher.SelfStartInfo(args) : DaemonLauncher.StartInfo(binary, args);
        var (pid, stdin) = DaemonLauncher.StartDetachedWithStdin(start, log);
        using (stdin)
        {
            // 1. The new daemon starts, loads its target and waits, warm. The old one still serves.
            try
            {
                WaitForWarm(pid, warm, log);
            }
            catch
            {
                // Its own session (setsid): a new supervisor's standby daemon goes with it.
                _ = Processes.SignalGroup(pid, Processes.SIGKILL);
                File.Delete(warm);
                throw;
            }
            File.Delete(warm);
            // Warm, it holds the takeover lock; an upgrade or recovery that finished before it took
            // the lock has replaced the daemon this one was about to ask (the kernel says so first:
            // that daemon saves its record only after it lets go of the lock).
            if (CurrentInfo(id).ublksrv_pid != daemon || DeviceRecord.Load(id) is not { } now || now.Pid != daemon)
            {
                stdin.Close();
                throw new IOException($"device {id}: another upgrade or recovery was in progress and has replaced daemon {daemon} meanwhile; this upgrade changed nothing: run it again to upgrade the new daemon");
            }
            // 2. The old daemon lets go: what it serves is answered, the rest waits in the kernel.
            var clock = Stopwatch.StartNew();
            long left;
            try
            {
                left = HandOverRequests.Send(id, daemon, HandOverTimeout);
            }
            catch (Exception e) when (e is IOException or TimeoutException)
            {
                // Closing its stdin sends the new daemon away; the old one, if it lives, still serves.
                stdin.Close();
                var serving = Processes.IsAlive(daemon) && (DeviceState)CurrentInfo(id).state == DeviceState.Live;
                throw new IOException(serving
                    ? $"device {id}: upgrade failed, the old daemon (pid {daemon}) keeps serving: {e.Message}"
                    : $"device {id}: upgrade failed while the old daemon (pid {daemon}) let go: {e.Message}; its IO is held: run 'ublksharp recover -n {id}'");
            }
            // Without QUIESCE_DEV the device turns QUIESCED only once the old daemon's exit is processed.
            WaitUntilNotLive(id, daemon);
            var handedOver = clock.Elapsed;
            // 3. The new daemon takes the device over.
            try
            {
                stdin.WriteLine("go");
                stdin.Flush();
                DaemonLauncher.WaitForReady(pid, ready, log);
            }
            catch (Exception e) when (CliErrors.IsExpected(e))
            {
                _ = Processes.SignalGroup(pid, Processes.SIGKILL);
                // The device is quiesced with its IO held: a daemon of this build takes it instead.
                CliLog.Warning($"device {id}: the new daemon failed to take over ({CliErrors.Describe(e)}); recovering it with this build");
                var (_, path) = DaemonLauncher.Launch(["recover", "-n", idText]);
                throw new IOException($"device {id}: upgrade failed; {path} is served again by this build's daemon, with no IO lost" +
                    (supervised ? "; it is no longer supervised (delete and add it again with --supervise to be)" : ""));
            }
            CliLog.Information($"device {id}: daemon {daemon} handed over to {(supervised ? "the new supervisor " : "")}{pid} in {handedOver.TotalMilliseconds:0} ms, taken over in {(clock.Elapsed - handedOver).TotalMilliseconds:0} ms ({left} requests waited in the kernel)");
            Console.WriteLine($"/dev/ublkb{id}");
        }
    }

    // The refusals, all made before anything is started.
    private static int Check(uint id, DevInfo info, DeviceRecord record)
    {
        if ((DeviceState)info.state != DeviceState.Live || !Processes.IsAlive(info.ublksrv_pid))
        {
            throw new RecoveryRefusedException($"device {id} is {((DeviceState)info.state).ToString().ToLowerInvariant()} and no daemon serves it: use 'ublksharp recover -n {id}'");
        }
        if (record.Target is "mem")
        {
            // As for recovery, which `add` refuses it. (A cow overlay's daemon writes its bitmap out
            // before it lets go, so a cow device created with recovery can be upgraded.)
            throw new RecoveryRefusedException($"device {id}: the {record.Target} target keeps data in its daemon's memory, which a new daemon cannot take over: upgrading it is refused (it would lose data)");
        }
        if (UblkDevice.HandOverRefusal(id, info.flags) is string refusal)
        {
            throw new RecoveryRefusedException(refusal);
        }
        if (record.Pid != info.ublksrv_pid)
        {
            throw new RecoveryRefusedException($"device {id}: its record names daemon {record.Pid}, but the kernel says {info.ublksrv_pid} serves it");
        }
        return info.ublksrv_pid;
    }

    private static DevInfo CurrentInfo(uint id)
    {
        using var control = ControlDevice.Open();
        try
        {
            return control.GetDeviceInfo(id);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            throw new ArgumentException($"no ublk device {id} (see 'ublksharp list')");
        }
    }

    private static void WaitUntilNotLive(uint id, int daemon)
    {
        using var control = ControlDevice.Open();
        var clock = Stopwatch.StartNew();
        while ((DeviceState)control.GetDeviceInfo(id).state == DeviceState.Live)
        {
            if (clock.Elapsed > HandOverTimeout)
            {
                throw new TimeoutException($"device {id} is still live {HandOverTimeout.TotalSeconds:0} s after its daemon (pid {daemon}) handed it over");
            }
            Thread.Sleep(1);
        }
    }

    private static void WaitForWarm(int pid, string warm, string log)
    {
        var clock = Stopwatch.StartNew();
        while (!File.Exists(warm))
        {
            if (!Processes.IsAlive(pid))
            {
                throw new DaemonFailedException($"the new daemon exited before it was ready to take over; the old daemon keeps serving. Its log ({log}) ends:\n{DaemonLauncher.LogTail(log)}");
            }
            if (clock.Elapsed > WarmTimeout)
            {
                throw new DaemonFailedException($"the new daemon was not ready within {WarmTimeout.TotalSeconds:0} s; the old daemon keeps serving. Log: {log}");
            }
            Thread.Sleep(10);
        }
    }
}
